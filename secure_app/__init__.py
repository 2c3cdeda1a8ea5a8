"""secure_app: a security-hardened Flask reference application."""

from __future__ import annotations

import os
from pathlib import Path

from flask import Flask

ROOT = Path(__file__).resolve().parent.parent


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app: configuration, perimeter, storage, blueprints and error pages."""
    app = Flask(
        __name__,
        template_folder=str(ROOT / "templates"),
        static_folder=str(ROOT / "public"),
        static_url_path="/public",
        # Tests and tools may keep keys elsewhere; the default is ./instance.
        instance_path=os.environ.get("FLASK_INSTANCE_PATH") or None,
    )

    from . import (
        account,
        audit,
        auth,
        cli,
        config,
        errors,
        mfa,
        pages,
        passkeys,
        passwords,
        recovery,
        security,
        security_page,
        store,
        two_factor,
    )
    from .sessions import Sha256SessionInterface

    config.configure(app, test_config)
    app.session_interface = Sha256SessionInterface()
    audit.init_app(app)
    security.init_app(app)
    store.init_app(app)
    passwords.init_app(app)
    mfa.init_app(app)
    errors.init_app(app)
    cli.init_app(app)

    app.register_blueprint(pages.bp)
    app.register_blueprint(auth.bp)
    app.register_blueprint(account.bp)
    two_factor.init_app(app)  # after auth: its hooks need g.user
    app.register_blueprint(security_page.bp)  # /security/sessions/end
    recovery.init_app(app)  # mail, /forgot-password, /reset-password, /verify-email
    passkeys.init_app(app)  # WebAuthn: sign-in, second step, re-authentication; the script's SRI
    return app
