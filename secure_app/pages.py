"""The public pages."""

from __future__ import annotations

from flask import Blueprint, g, render_template

from .forms import LoginForm

bp = Blueprint("pages", __name__)


@bp.get("/")
def index() -> str:
    """The home page: what the site shows, and a login form for visitors."""
    return render_template("index.html", form=None if g.user else LoginForm())


@bp.get("/second")
def second() -> str:
    """The second page: how each protection works."""
    return render_template("second.html")
