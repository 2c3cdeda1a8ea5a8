"""The public pages."""

from __future__ import annotations

from flask import Blueprint, g, render_template, request

from .forms import LoginForm

bp = Blueprint("pages", __name__)

# Shown after a session ends, when no cookie is left to carry a flash message.
# Only these fixed texts can appear: the URL picks one, it cannot inject text.
NOTICES = {
    "logged-out": "You have been logged out.",
    "account-deleted": "Your account and its data have been deleted.",
}


@bp.get("/")
def index() -> str:
    """The home page: what the site shows, and a login form for visitors."""
    notice = NOTICES.get(request.args.get("notice", ""))
    return render_template("index.html", form=None if g.user else LoginForm(), notice=notice)


@bp.get("/second")
def second() -> str:
    """The second page: how each protection works."""
    return render_template("second.html")
