"""Flask-WTF forms and their field rules (DESIGN.md, "Field rules").

Every form carries ``csrf_token``; ``CSRFProtect`` in ``security.py`` also
refuses any POST without a valid one, form class or not.
"""

from __future__ import annotations

import re
import unicodedata

from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from wtforms import PasswordField, StringField, TextAreaField
from wtforms.validators import (
    DataRequired,
    Email,
    EqualTo,
    Length,
    Optional,
    Regexp,
    ValidationError,
)

from . import passwords

USERNAME_RE = re.compile(r"[a-z0-9._-]{3,32}\Z")


def normalize_username(value: object) -> str:
    """Usernames compare case-insensitively: keep them in lower case."""
    return value.lower() if isinstance(value, str) else ""


# Zero-width (non-)joiners are format characters that Persian, Indic scripts
# and emoji sequences need; every other one (bidi overrides that reorder what
# a reader sees, invisible spaces) has no place in a name.
_JOINERS = {"\u200c", "\u200d"}


def _no_control_characters(form: FlaskForm, field: StringField) -> None:
    if any(
        unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") and ch not in _JOINERS
        for ch in field.data or ""
    ):
        raise ValidationError("Remove line breaks and invisible control characters.")


def _text_only(form: FlaskForm, field: StringField) -> None:
    # A lone surrogate is not text: it cannot be encoded into the page that
    # shows it. Werkzeug's form decoding never makes one; this keeps any other
    # way in (a future JSON route, a changed parser) from storing one.
    data = "" if field.data is None else field.data
    if not isinstance(data, str) or any("\ud800" <= ch <= "\udfff" for ch in data):
        raise ValidationError("This is not text that can be saved.")


def _strong_password(form: FlaskForm, field: PasswordField) -> None:
    # The username (the form's, or the logged-in user's) is context for zxcvbn.
    username = form.username.data if "username" in form else getattr(form, "for_username", "")
    problem = passwords.policy_problem(field.data or "", username or "")
    if problem:
        raise ValidationError(problem)


def _password_length() -> Length:
    return Length(
        min=passwords.MIN_LENGTH,
        max=passwords.MAX_LENGTH,
        message=f"Use {passwords.MIN_LENGTH} to {passwords.MAX_LENGTH} characters.",
    )


username_field = StringField(
    "Username",
    filters=[normalize_username],
    validators=[
        DataRequired("Choose a username."),
        Regexp(
            USERNAME_RE,
            message="Use 3 to 32 characters: letters, digits, dot, underscore or hyphen.",
        ),
    ],
)


class RegisterForm(FlaskForm):
    username = username_field
    password = PasswordField(
        "Password", validators=[DataRequired("Choose a password."), _password_length()]
    )
    confirm = PasswordField(
        "Repeat the password",
        validators=[DataRequired("Repeat the password."), EqualTo("password", "Does not match.")],
    )

    def validate_password(self, field: PasswordField) -> None:
        # Runs after the length check passed, so zxcvbn never sees 10 kB.
        if not field.errors:
            _strong_password(self, field)


class LoginForm(FlaskForm):
    # No format rules here: every failure gets the same generic message.
    username = StringField(
        "Username", filters=[normalize_username], validators=[DataRequired(), Length(max=64)]
    )
    password = PasswordField(
        "Password", validators=[DataRequired(), Length(max=passwords.MAX_LENGTH)]
    )


class AccountForm(FlaskForm):
    full_name = StringField(
        "Full name",
        validators=[Length(max=100, message="Use at most 100 characters."), _no_control_characters],
    )
    email = StringField(
        "Email",
        validators=[
            Optional(),
            Length(max=254, message="Use at most 254 characters."),
            Email("Enter an email address such as name@example.org."),
        ],
    )
    phone = StringField(
        "Phone",
        validators=[
            Length(max=32, message="Use at most 32 characters."),
            Regexp(r"[0-9 +\-()]*\Z", message="Use digits, spaces and + - ( ) only."),
        ],
    )
    bio = TextAreaField(
        "About you",
        validators=[Length(max=1000, message="Use at most 1000 characters."), _text_only],
    )
    photo = FileField("Profile photo (JPEG, PNG or WebP, at most 5 MiB)")


def _new_password_field() -> PasswordField:
    return PasswordField(
        "New password", validators=[DataRequired("Choose a new password."), _password_length()]
    )


def _repeat_field(of: str) -> PasswordField:
    return PasswordField(
        "Repeat the new password",
        validators=[DataRequired("Repeat the new password."), EqualTo(of, "Does not match.")],
    )


class ChangePasswordForm(FlaskForm):
    current_password = PasswordField(
        "Current password",
        validators=[DataRequired("Enter your current password."), Length(max=passwords.MAX_LENGTH)],
    )
    new_password = _new_password_field()
    confirm = _repeat_field("new_password")

    def validate_new_password(self, field: PasswordField) -> None:
        if not field.errors:
            _strong_password(self, field)


class ResetForm(FlaskForm):
    """The new password behind a reset link (DESIGN.md: fields ``password`` and ``confirm``)."""

    password = _new_password_field()
    confirm = _repeat_field("password")

    def validate_password(self, field: PasswordField) -> None:
        if not field.errors:  # after the length check: zxcvbn never sees 10 kB
            _strong_password(self, field)


class DeleteAccountForm(FlaskForm):
    password = PasswordField(
        "Password",
        validators=[DataRequired("Enter your password."), Length(max=passwords.MAX_LENGTH)],
    )
