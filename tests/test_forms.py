"""Field rules of each form, checked on the form itself: what is refused, with which message.

The handlers' tests (test_auth, test_account, test_fuzz_forms) show that a refused form
stores nothing; these pin each rule's boundary and message without the HTTP round trip.
"""

from __future__ import annotations

import pytest
from werkzeug.datastructures import MultiDict

from helpers import OTHER_PASSWORD, PASSWORD
from secure_app import forms


@pytest.fixture
def validate(app):
    """Validate ``form_class`` on posted ``data``; return the form (CSRF is tested elsewhere)."""

    def run(form_class, data: dict, **attributes):
        with app.test_request_context(method="POST", data=MultiDict(data)):
            form = form_class(meta={"csrf": False})
            for name, value in attributes.items():
                setattr(form, name, value)
            form.validate()
            return form

    return run


def _register(validate, username: str = "alice", password: str = PASSWORD, confirm=None):
    data = {"username": username, "password": password, "confirm": confirm or password}
    return validate(forms.RegisterForm, data)


def test_usernames_are_kept_in_lower_case(validate):
    form = _register(validate, "Alice.Smith-1")
    assert form.errors == {}
    assert form.username.data == "alice.smith-1"


def test_a_username_that_is_not_text_normalizes_to_nothing():
    assert forms.normalize_username(None) == ""
    assert forms.normalize_username(["ALICE"]) == ""


def test_register_refuses_a_password_outside_15_to_128_characters_with_one_message(validate):
    for password in ("x" * 14, "y" * 129, "z" * 10_000):
        form = _register(validate, password=password)
        # Only the length message: the guessability check never ran on it.
        assert form.errors == {"password": ["Use 15 to 128 characters."]}


def test_register_refuses_a_guessable_password_with_zxcvbn_advice(validate):
    form = _register(validate, password="1qaz2wsx3edc4rfv")
    assert form.errors == {
        "password": ["This password is too easy to guess. This is a very common password."]
    }


def test_the_username_is_context_for_the_guessability_check(validate):
    assert _register(validate, "zebra", "marmaladeskies2024").errors == {}
    assert "password" in _register(validate, "marmaladeskies", "marmaladeskies2024").errors


def test_register_says_when_the_repeat_does_not_match(validate):
    form = _register(validate, password=PASSWORD, confirm=OTHER_PASSWORD)
    assert form.errors == {"confirm": ["Does not match."]}


def _change(validate, new: str, confirm: str | None = None, username: str = "alice"):
    data = {"current_password": "anything", "new_password": new, "confirm": confirm or new}
    return validate(forms.ChangePasswordForm, data, for_username=username)


def test_change_password_checks_the_new_password_against_the_users_name(validate):
    assert _change(validate, "marmaladeskies2024", username="zebra").errors == {}
    form = _change(validate, "marmaladeskies2024", username="marmaladeskies")
    assert list(form.errors) == ["new_password"]


def test_change_password_field_rules_and_messages(validate):
    assert _change(validate, "x" * 14).errors == {"new_password": ["Use 15 to 128 characters."]}
    assert _change(validate, "x" * 129).errors == {"new_password": ["Use 15 to 128 characters."]}
    assert _change(validate, PASSWORD, OTHER_PASSWORD).errors == {"confirm": ["Does not match."]}
    form = validate(forms.ChangePasswordForm, {}, for_username="alice")
    assert form.errors == {
        "current_password": ["Enter your current password."],
        "new_password": ["Choose a new password."],
        "confirm": ["Repeat the new password."],
    }


def test_a_new_password_form_without_a_username_still_judges_the_password(validate):
    """The handlers name the user (``for_username``); without one, zxcvbn has no name to use."""
    for form_class, field, data in [
        (forms.ResetForm, "password", {}),
        (forms.ChangePasswordForm, "new_password", {"current_password": "anything"}),
    ]:
        strong = {**data, field: PASSWORD, "confirm": PASSWORD}
        assert validate(form_class, strong).errors == {}
        weak = {**data, field: "1qaz2wsx3edc4rfv", "confirm": "1qaz2wsx3edc4rfv"}
        assert list(validate(form_class, weak).errors) == [field]


def test_reset_form_has_the_same_password_rules(validate):
    def reset(password: str, confirm: str | None = None, username: str = "alice"):
        data = {"password": password, "confirm": confirm or password}
        return validate(forms.ResetForm, data, for_username=username)

    assert reset(PASSWORD).errors == {}
    assert reset("x" * 14).errors == {"password": ["Use 15 to 128 characters."]}
    assert reset(PASSWORD, OTHER_PASSWORD).errors == {"confirm": ["Does not match."]}
    assert list(reset("marmaladeskies2024", username="marmaladeskies").errors) == ["password"]
    assert list(reset("1qaz2wsx3edc4rfv").errors) == ["password"]
    assert validate(forms.ResetForm, {}).errors == {
        "password": ["Choose a new password."],
        "confirm": ["Repeat the new password."],
    }


CONTROL = "Remove line breaks and invisible control characters."


@pytest.mark.parametrize(
    "character",
    [
        "\n",  # Cc
        "\x00",  # Cc
        "\u202e",  # Cf: right-to-left override
        "\u200b",  # Cf: zero-width space
        "\u2028",  # Zl: line separator
        "\u2029",  # Zp: paragraph separator
    ],
)
def test_a_full_name_with_a_control_or_invisible_character_is_refused(validate, character):
    form = validate(forms.AccountForm, {"full_name": "Ada" + character + "Lovelace"})
    assert form.errors == {"full_name": [CONTROL]}


def test_a_full_name_with_a_lone_surrogate_is_refused(app):
    """Werkzeug's form decoding never makes one; no other way in may store one either."""
    with app.test_request_context(method="POST"):
        for name in ("Ada \ud800 Lovelace", "\udfff"):
            form = forms.AccountForm(formdata=None, data={"full_name": name}, meta={"csrf": False})
            form.validate()
            assert form.errors == {"full_name": [CONTROL]}


@pytest.mark.parametrize("joiner", ["\u200c", "\u200d"])
def test_a_full_name_may_hold_the_joiners_scripts_and_emoji_need(validate, joiner):
    assert validate(forms.AccountForm, {"full_name": "می" + joiner + "خواهم"}).errors == {}


def test_a_bio_with_a_lone_surrogate_is_refused_and_ordinary_text_passes(app):
    with app.test_request_context(method="POST"):
        for bio, errors in [
            ("Zoë 👩‍👩‍👧 <b>", {}),
            ("half \ud800 a pair", {"bio": ["This is not text that can be saved."]}),
            ("\udfff", {"bio": ["This is not text that can be saved."]}),
        ]:
            form = forms.AccountForm(formdata=None, data={"bio": bio}, meta={"csrf": False})
            form.validate()
            assert form.errors == errors


def test_a_missing_bio_is_no_text_problem(app):
    with app.test_request_context(method="POST"):
        form = forms.AccountForm(formdata=None, data={"bio": None}, meta={"csrf": False})
        form.validate()
        assert form.errors == {}


def test_each_password_field_is_labelled_with_what_it_asks_for(app):
    """The label is what a screen reader announces: the two new-password fields must differ."""
    with app.test_request_context():
        change = forms.ChangePasswordForm(meta={"csrf": False})
        reset = forms.ResetForm(meta={"csrf": False})
    labels = [
        change.current_password.label.text,
        change.new_password.label.text,
        change.confirm.label.text,
    ]
    assert labels == ["Current password", "New password", "Repeat the new password"]
    assert [reset.password.label.text, reset.confirm.label.text] == labels[1:]
