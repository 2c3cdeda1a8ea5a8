"""The WSGI entry point for gunicorn. Debug is forced off: no debugger, no tracebacks."""

from . import create_app

app = create_app()
app.debug = False
app.config["PROPAGATE_EXCEPTIONS"] = False
