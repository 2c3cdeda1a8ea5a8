"""The baseline for bench/http_load.py: plain Flask, no extensions, rendering secure_app's pages.

It renders the same ``second.html`` and ``account-details.html`` through the
same ``_base.html`` as secure_app, with the same endpoint names, so the HTML
is the same bytes except the CSRF token values. What it leaves out is exactly
what the benchmark prices: Talisman's headers, CSRF, the rate limiter, the
signed session cookie, the server-side session check and the store read.

Its ``POST /login`` does only what no login can skip: read the form, one
Argon2id verify at secure_app's parameters, and a redirect. Timed over the
same HTTP path as secure_app's, it prices everything a real login adds to
the hash (CSRF, the store read and its synced write, the session, the audit
line) with the HTTP client's own cost cancelled out.

Serve it like the real app: ``gunicorn -c gunicorn.conf.py --pythonpath bench bare_app:app``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher, Type
from argon2.exceptions import VerificationError
from flask import Blueprint, Flask, abort, g, redirect, render_template, request
from wtforms import Form, HiddenField
from wtforms.fields.core import UnboundField

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The field definitions themselves (labels, validators, widgets) come from secure_app,
# so the markup cannot drift; only FlaskForm (the CSRF machinery) is left out.
from secure_app.forms import AccountForm, DeleteAccountForm  # noqa: E402
from secure_app.passwords import ARGON2_DEFAULTS  # noqa: E402

# Same length and alphabet as a Flask-WTF token, so the pages have the same size.
FAKE_CSRF = (
    "IjBiZW5jaC1iYXJlLWFwcC1ub3QtYS1yZWFsLWNzcmYtdG9rZW4tMDAw.Z2hpag.bm90LWEtcmVhbC10b2tlbi1hdC1"
)

# The record the bench also saves to secure_app's benchmark user (bench/http_load.py).
RECORD: dict[str, Any] = {
    "username": "benchuser",
    "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$c29tZWhhc2g",
    "created": 1700000000,
    "full_name": "Ada Lovelace",
    "email": "ada@example.org",
    "phone": "+44 20 7946 0000",
    "bio": "Analyst of engines, first to publish an algorithm for one.",
    "photo": None,
    "sessions": {"0" * 64: 1700000000},
}
PROFILE_FIELDS = ("full_name", "email", "phone", "bio")
# The bench user's password (bench/http_load.py registers it on secure_app too).
PASSWORD = "quartz lantern drifts over seven quiet hills"
HASHER = PasswordHasher(
    time_cost=ARGON2_DEFAULTS["ARGON2_TIME_COST"],
    memory_cost=ARGON2_DEFAULTS["ARGON2_MEMORY_COST"],
    parallelism=ARGON2_DEFAULTS["ARGON2_PARALLELISM"],
    type=Type.ID,
)
PASSWORD_HASH = HASHER.hash(PASSWORD)


def _plain_form(form_class: type) -> type[Form]:
    """Return a plain WTForms class with ``form_class``'s fields and a fixed csrf_token field."""
    fields = {k: v for k, v in vars(form_class).items() if isinstance(v, UnboundField)}
    fields["csrf_token"] = HiddenField(default=FAKE_CSRF)
    return type("Plain" + form_class.__name__, (Form,), fields)


PlainAccountForm = _plain_form(AccountForm)
PlainDeleteForm = _plain_form(DeleteAccountForm)

pages = Blueprint("pages", __name__)
auth = Blueprint("auth", __name__)
account = Blueprint("account", __name__)


@pages.get("/")
def index() -> str:
    return "index"


@pages.get("/second")
def second() -> str:
    return render_template("second.html")


@account.get("/account-details")
def details() -> str:
    """The account page for a fixed, logged-in user."""
    g.user = RECORD
    form = PlainAccountForm(data={f: RECORD[f] for f in PROFILE_FIELDS})
    return render_template(
        "account-details.html",
        form=form,
        user=RECORD,
        session_count=len(RECORD["sessions"]),
        # What secure_app shows after the bench saved this address: a link sent, not yet used.
        email={"address": RECORD["email"], "verified": False, "pending": bool(RECORD["email"])},
        delete_form=PlainDeleteForm(),
    )


@auth.route("/login", methods=("GET", "POST"))
def login():
    """One Argon2id verify of the posted password, then the same redirect as secure_app's."""
    if request.method == "GET":
        return _stub()
    try:
        HASHER.verify(PASSWORD_HASH, request.form.get("password", ""))
    except VerificationError:
        abort(401)
    return redirect("/account-details")


def _stub() -> str:
    return "stub"


# Endpoints the layout and the account page link to, under secure_app's names.
for bp, rule, name in (
    (auth, "/register", "register"),
    (auth, "/logout", "logout"),
    (auth, "/logout-others", "logout_others"),
    (auth, "/change-password", "change_password"),
    (auth, "/delete-account", "delete_account"),
    (account, "/account-details/remove-photo", "remove_photo"),
    (account, "/public/images/profile/<name>", "photo"),
):
    bp.add_url_rule(rule, name, _stub)


def create_bare_app() -> Flask:
    """Build the bare app: secure_app's templates and static folder, nothing else."""
    app = Flask(
        __name__,
        template_folder=str(ROOT / "templates"),
        static_folder=str(ROOT / "public"),
        static_url_path="/public",
    )
    app.jinja_env.globals["csrf_token"] = lambda: FAKE_CSRF
    app.before_request(lambda: setattr(g, "user", None))
    for bp in (pages, auth, account):
        app.register_blueprint(bp)
    # The layout links to the security page (stage 2): a stub under secure_app's endpoint name.
    app.add_url_rule("/security", "two_factor.security", _stub)
    return app


app = create_bare_app()
