"""The email on the account page: re-authentication, verification, notices to the old one."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_recovery import body, confirm, link_of, outbox, record
from test_two_factor import flashes, two_factor_app

from helpers import AuthActions, csrf_token, stored_bytes
from secure_app.account import EMAIL_OUTCOMES


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock):
    return two_factor_app(tmp_path, monkeypatch, PUBLIC_URL="https://www.example.org")


def save(client, email: str, full_name: str = "Alice"):
    token = csrf_token(client, "/account-details")
    return client.post(
        "/account-details",
        data={"csrf_token": token, "full_name": full_name, "email": email},
    )


def logged_in(client) -> AuthActions:
    actions = AuthActions(client)
    assert actions.register().status_code == 302
    assert actions.login().status_code == 302
    return actions


def test_a_new_address_is_unverified_until_its_link_is_used(app, client):
    logged_in(client)
    assert save(client, "alice@example.org").status_code == 303
    rec = record(app)
    assert rec["email"] == "alice@example.org" and not rec.get("email_verified")
    page = client.get("/account-details").get_data(as_text=True)
    assert "Not verified" in page
    (message,) = [m for m in outbox(app) if m["To"] == "alice@example.org"]
    assert confirm(client, link_of(message)).status_code == 200
    assert record(app)["email_verified"] == "alice@example.org"
    assert "Verified: used to recover" in client.get("/account-details").get_data(as_text=True)


def test_changing_the_address_needs_a_fresh_authentication_and_saves_nothing_before(
    app, client, clock
):
    logged_in(client)
    clock.advance(app.config["REAUTH_WINDOW"] + 1)
    client.get("/account-details")  # the page itself, not stale-sensitive
    before = stored_bytes(app)
    response = save(client, "mallory@evil.example", full_name="Changed")
    assert response.status_code == 303
    assert response.headers["Location"].startswith("/reauthenticate?next=/account-details")
    assert flashes(client, response.headers["Location"]) == [
        ("flash-info", "To change your email address, confirm it is you, then save again.")
    ]
    assert stored_bytes(app) == before  # not even the name: nothing is saved half-way
    assert not [m for m in outbox(app) if m["To"] == "mallory@evil.example"]
    # The same save without touching the address goes through.
    assert save(client, "", full_name="Changed").status_code == 303
    assert record(app)["full_name"] == "Changed"


def test_the_old_verified_address_is_told_and_keeps_working_until_the_new_one_is_verified(
    app, client
):
    logged_in(client)
    save(client, "alice@example.org")
    confirm(client, link_of([m for m in outbox(app) if m["To"] == "alice@example.org"][-1]))
    assert save(client, "alice@new.example").status_code == 303
    notices = [m for m in outbox(app) if m["To"] == "alice@example.org"]
    assert "A new email address was set" in body(notices[-1])
    rec = record(app)
    assert rec["email"] == "alice@new.example"
    assert rec["email_verified"] == "alice@example.org"  # still the recovery address


def test_a_password_change_is_notified_to_the_verified_address(app, client):
    logged_in(client)
    save(client, "alice@example.org")
    confirm(client, link_of([m for m in outbox(app) if m["To"] == "alice@example.org"][-1]))
    assert AuthActions(client).change_password().status_code == 302
    notice = [m for m in outbox(app) if m["To"] == "alice@example.org"][-1]
    assert "Your password was changed" in body(notice)
    assert "127.0.0.1" in body(notice)


@pytest.mark.parametrize(
    ("forwarded", "shown"),
    [("203.0.113.9", "203.0.113.9"), ("fe80::1%Call +1 555 0100", "fe80::1"), ("<b>", "unknown")],
)
def test_a_notice_shows_only_a_real_address_from_a_forwarded_header(
    tmp_path, monkeypatch, clock, forwarded, shown
):
    """The header is the client's to write: a notice must not carry its text to the owner."""
    app = two_factor_app(tmp_path, monkeypatch, PROXY_HOPS=1)
    client = app.test_client()
    logged_in(client)
    save(client, "alice@example.org")
    confirm(client, link_of([m for m in outbox(app) if m["To"] == "alice@example.org"][-1]))
    client.environ_base["HTTP_X_FORWARDED_FOR"] = forwarded
    assert AuthActions(client).change_password().status_code == 302
    notice = body([m for m in outbox(app) if m["To"] == "alice@example.org"][-1])
    assert f"From IP address: {shown}" in notice.splitlines()
    assert "555" not in notice and "<b>" not in notice


def test_factor_changes_and_an_operator_reset_are_notified(app, client, clock):
    from test_two_factor import enrol

    logged_in(client)
    save(client, "alice@example.org")
    confirm(client, link_of([m for m in outbox(app) if m["To"] == "alice@example.org"][-1]))
    enrol(client, clock)
    notices = [body(m) for m in outbox(app) if m["To"] == "alice@example.org"]
    assert "Two-step sign-in was turned on" in notices[-1]
    result = app.test_cli_runner().invoke(args=["reset-two-factor", "alice"])
    assert result.exit_code == 0, result.output
    notices = [body(m) for m in outbox(app) if m["To"] == "alice@example.org"]
    assert "An operator removed your second factors" in notices[-1]
    assert record(app)["events"][-1]["k"] == "two_factor_reset"


def test_each_address_change_says_what_happens_to_recovery(app, client):
    def flashed(response) -> list[tuple[str, str]]:
        assert response.status_code == 303
        return flashes(client, response.headers["Location"])

    saved = ("flash-success", "Your details have been saved.")
    logged_in(client)
    assert flashed(save(client, "alice@example.org")) == [
        saved,
        ("flash-info", EMAIL_OUTCOMES["pending"]),
    ]
    confirm(client, link_of([m for m in outbox(app) if m["To"] == "alice@example.org"][-1]))
    flashed(save(client, "alice@new.example"))
    assert flashed(save(client, "alice@example.org")) == [
        saved,
        ("flash-info", EMAIL_OUTCOMES["verified"]),
    ]
    assert flashed(save(client, "")) == [saved, ("flash-info", EMAIL_OUTCOMES["removed"])]
    # Saving without touching the address says nothing about it.
    assert flashed(save(client, "", full_name="Alice L.")) == [saved]


def test_an_address_of_only_spaces_is_no_address(app, client):
    logged_in(client)
    before = record(app)["email"]
    assert save(client, "   ", full_name="Alice L.").status_code == 303
    assert record(app)["email"] == before == ""
    assert record(app)["full_name"] == "Alice L."
    assert outbox(app) == []
    # Over a verified address, spaces remove it as an empty field does.
    save(client, "alice@example.org")
    confirm(client, link_of(outbox(app)[-1]))
    assert save(client, "   ").status_code == 303
    assert (record(app)["email"], record(app)["email_verified"]) == ("", None)


def test_a_save_that_keeps_the_address_needs_no_fresh_authentication(app, client, clock):
    logged_in(client)
    assert save(client, "alice@example.org").status_code == 303
    clock.advance(app.config["REAUTH_WINDOW"] + 1)
    response = save(client, "alice@example.org", full_name="Alice L.")
    assert response.headers["Location"] == "/account-details"
    assert record(app)["full_name"] == "Alice L."
    # A form without the email field at all keeps the stored address.
    token = csrf_token(client, "/account-details")
    response = client.post("/account-details", data={"csrf_token": token, "full_name": "A."})
    assert response.headers["Location"] == "/account-details"
    assert (record(app)["full_name"], record(app)["email"]) == ("A.", "alice@example.org")
