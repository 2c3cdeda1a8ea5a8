"""The WSGI entry point for gunicorn. Debug is forced off: no debugger, no tracebacks.

``FLASK_DEBUG=1`` left in a production environment would otherwise turn
debug on through ``from_prefixed_env``; here it is overridden and logged.
"""

import logging

from . import create_app

app = create_app()
if app.debug:
    logging.getLogger(__name__).warning("FLASK_DEBUG is ignored: gunicorn never serves in debug")
app.debug = False
# An unhandled error becomes the plain 500 page, never a traceback passed up to gunicorn.
app.config["PROPAGATE_EXCEPTIONS"] = False
