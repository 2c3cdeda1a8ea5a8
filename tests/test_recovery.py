"""Account recovery through the real handlers: verify an address, forget, reset, and the attacks.

Mail goes to the default ``file`` backend; each test reads the ``.eml``
files the app wrote, as a person trying the site would. A fake clock
(``time.time`` replaced for the whole app) expires links without waiting.
"""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import test_two_factor
from flask import g, session
from test_two_factor import flashes, two_factor_app

from helpers import (
    CSRF_RE,
    OTHER_PASSWORD,
    PASSWORD,
    AuthActions,
    csrf_token,
    stored_bytes,
    stored_records,
)
from secure_app import auth, mail, mfa, recovery
from secure_app.store import get_store

audit_events = test_two_factor.audit_events  # the fixture, shared

NEW_PASSWORD = "saffron kettle whistles beneath copper rain"
LINK_RE = re.compile(r"^(https?://\S+)\r?$", re.M)


# -- helpers -------------------------------------------------------------------------


def outbox(app) -> list[email.message.EmailMessage]:
    """Every message the app has written so far, oldest first (after the queue drained)."""
    assert mail.flush(10, app), "the mail queue did not drain"
    folder = Path(app.config["MAIL_FILE_PATH"])
    files = sorted(folder.glob("*.eml")) if folder.exists() else []
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in files]


def body(msg: email.message.EmailMessage) -> str:
    return msg.get_body(("plain",)).get_content()


def link_of(msg: email.message.EmailMessage) -> str:
    match = LINK_RE.search(body(msg))
    assert match, body(msg)
    return match.group(1)


def last_to(app, address: str) -> email.message.EmailMessage:
    """The newest message to ``address``."""
    return [m for m in outbox(app) if m["To"] == address][-1]


def path_of(link: str) -> str:
    return urlsplit(link).path


def record(app, username: str = "alice") -> dict:
    with app.app_context():
        return get_store().get(username)


def change_email(app, client, address: str) -> str:
    """Call ``request_email_change`` as the account page will: in this client's live session."""
    with client.session_transaction() as cookie:
        values = dict(cookie)
    with app.test_request_context(environ_base={"REMOTE_ADDR": "127.0.0.1"}):
        session.update(values)
        auth.load_logged_in_user()
        assert g.user is not None, "the client is not logged in"
        return recovery.request_email_change(address)


def confirm(client, link: str):
    """Open a verification link and press its button."""
    page = client.get(path_of(link))
    assert page.status_code == 200
    return client.post(path_of(link), data={"csrf_token": csrf_token(client, path_of(link))})


def ask_reset(client, address: str, **kwargs):
    token = csrf_token(client, "/forgot-password")
    return client.post("/forgot-password", data={"email": address, "csrf_token": token}, **kwargs)


def use_link(client, link: str, password: str = NEW_PASSWORD, confirm_as: str | None = None):
    """POST a new password to a reset link (the CSRF token from a page that always has one)."""
    return client.post(
        path_of(link),
        data={
            "password": password,
            "confirm": password if confirm_as is None else confirm_as,
            "csrf_token": csrf_token(client, "/forgot-password"),
        },
    )


def verified_user(app, client, username: str, address: str, password: str = PASSWORD) -> None:
    """Register ``username`` and verify ``address`` through the real flow; log out."""
    actions = AuthActions(client)
    assert actions.register(username, password).status_code == 302
    assert actions.login(username, password).status_code == 302
    assert change_email(app, client, address) == "pending"
    assert confirm(client, link_of(last_to(app, address))).status_code == 200
    assert record(app, username)["email_verified"] == address
    actions.logout()


def logged_in_as(client) -> bool:
    return client.get("/account-details").status_code == 200


def reset_link(app, client, address: str = "alice@example.org") -> str:
    before = len(outbox(app))
    assert ask_reset(client, address).status_code == 200
    messages = outbox(app)
    assert len(messages) == before + 1
    return link_of(messages[-1])


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock):
    return two_factor_app(tmp_path, monkeypatch, PUBLIC_URL="https://www.example.org")


@pytest.fixture
def alice(app, client) -> None:
    verified_user(app, client, "alice", "alice@example.org")


# -- the whole flow ------------------------------------------------------------------------


def test_forgot_reset_and_log_in_with_the_new_password(app, client, alice) -> None:
    page = ask_reset(client, "alice@example.org")
    assert page.status_code == 200
    assert "Check your email" in page.get_data(as_text=True)
    msg = outbox(app)[-1]
    assert msg["To"] == "alice@example.org"
    assert msg["From"] == "secure_app <no-reply@www.example.org>"
    assert msg["Subject"] == "Reset your password"
    assert msg["Date"] and msg["Message-ID"].endswith("@www.example.org>")
    link = link_of(msg)
    assert link.startswith("https://www.example.org/reset-password/")
    token = path_of(link).rsplit("/", 1)[1]
    assert len(token.split(".")[1]) == 43  # 256 random bits
    assert token.encode() not in b"".join(stored_records(app).values())  # only its digest is kept

    form = client.get(path_of(link))
    assert form.status_code == 200
    assert form.headers["Referrer-Policy"] == "no-referrer"
    assert form.headers["Cache-Control"] == "no-store"
    done = use_link(client, link)
    assert done.status_code == 303
    assert done.headers["Location"] == "/login"
    assert done.headers["Referrer-Policy"] == "no-referrer"
    assert not logged_in_as(client)  # the reset logs nobody in

    notice = outbox(app)[-1]
    assert notice["To"] == "alice@example.org"
    assert "reset" in notice["Subject"]
    text = body(notice)
    assert "From IP address: 127.0.0.1" in text and "UTC" in text
    assert "If it was not you" in text and "https://www.example.org/forgot-password" in text

    actions = AuthActions(client)
    assert actions.login("alice", PASSWORD).status_code == 200  # the old password: refused
    assert actions.login("alice", NEW_PASSWORD).status_code == 302
    assert client.get(path_of(link)).status_code == 404  # the used link


def test_the_reset_page_refuses_a_weak_or_mismatched_password_and_keeps_the_link(
    app, client, alice
) -> None:
    link = reset_link(app, client)
    before = stored_bytes(app)
    for password, confirm_as in [("short", None), ("password" * 3, None), (NEW_PASSWORD, "x")]:
        response = use_link(client, link, password, confirm_as)
        assert response.status_code == 422
        assert stored_bytes(app) == before
    assert use_link(client, link).status_code == 303


# -- the same answer for every address (V6.3.8) ---------------------------------------


def test_known_unknown_and_unverified_addresses_get_the_same_page(app, client, alice) -> None:
    bob = app.test_client()
    AuthActions(bob).register("bob")
    AuthActions(bob).login("bob")
    assert change_email(app, bob, "bob@example.org") == "pending"  # typed, never verified
    sent = len(outbox(app))
    before = stored_bytes(app)
    answers = []
    for address in ["nobody@example.org", "bob@example.org", "alice@example.org"]:
        response = ask_reset(app.test_client(), address)
        html = response.get_data(as_text=True).replace(address, "ADDRESS")
        answers.append((response.status_code, sorted(response.headers.keys()), html))
    assert answers[0] == answers[1] == answers[2]
    messages = outbox(app)[sent:]
    assert [m["To"] for m in messages] == ["alice@example.org"]
    # Only alice's record changed (her new link) and one new message appeared.
    after = stored_bytes(app)
    changed = {p for p in after if after[p] != before.get(p)}
    record = {str(Path(app.config["DATA_DIR"]) / "users.jsonl"), "postgres:users/alice"}
    assert len(changed & record) == 1
    assert len([p for p in changed - record if p.endswith(".eml")]) == 1
    assert len(changed) == 2


def test_an_unknown_address_changes_nothing_at_all(app, client, alice) -> None:
    before = stored_bytes(app)
    assert ask_reset(client, "nobody@example.org").status_code == 200
    outbox(app)
    assert stored_bytes(app) == before


def test_the_link_goes_to_the_stored_address_never_the_typed_one(app, client, alice) -> None:
    assert ask_reset(client, "ALICE@Example.ORG").status_code == 200
    assert outbox(app)[-1]["To"] == "alice@example.org"
    sent = len(outbox(app))
    # A Kelvin sign folds onto "k" under Unicode case mapping (Django CVE-2019-19844).
    verified_user(app, client, "kim", "kim@example.org")
    sent = len(outbox(app))
    for lookalike in ["\u212aim@example.org", "kım@example.org", "kim@example.org\u200b"]:
        response = ask_reset(client, lookalike)
        assert response.status_code in (200, 422)
    assert len(outbox(app)) == sent


def test_several_accounts_with_one_address_get_one_message_each(app, client, alice) -> None:
    verified_user(app, client, "alice2", "alice@example.org")
    sent = len(outbox(app))
    ask_reset(client, "alice@example.org")
    messages = outbox(app)[sent:]
    assert sorted(m["To"] for m in messages) == ["alice@example.org"] * 2
    assert sorted("Hello alice2," in body(m) for m in messages) == [False, True]


# -- links never come from the request ---------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [{}, {"PROXY_HOPS": 1, "TRUST_FORWARDED_HOST": True}],
    ids=["direct", "behind-a-proxy-trusting-forwarded-host"],
)
def test_a_forged_host_still_mails_the_real_sites_link(
    tmp_path, monkeypatch, clock, config
) -> None:
    app = two_factor_app(tmp_path, monkeypatch, PUBLIC_URL="https://www.example.org", **config)
    client = app.test_client()
    verified_user(app, client, "alice", "alice@example.org")
    forged = app.test_client()
    page = forged.get("/forgot-password", base_url="http://evil.example").get_data(as_text=True)
    token = next(group for group in CSRF_RE.search(page).groups() if group)
    response = forged.post(
        "/forgot-password",
        base_url="http://evil.example",
        headers={"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"},
        data={"email": "alice@example.org", "csrf_token": token},
    )
    assert response.status_code == 200
    msg = outbox(app)[-1]
    assert "evil" not in msg.as_string()
    assert link_of(msg).startswith("https://www.example.org/reset-password/")


# -- what kills a link ---------------------------------------------------------------------


def test_a_link_works_once(app, client, alice) -> None:
    link = reset_link(app, client)
    assert use_link(client, link).status_code == 303
    stored = record(app)["password_hash"]
    again = use_link(client, link, OTHER_PASSWORD)
    assert again.status_code == 404
    assert "This link does not work" in again.get_data(as_text=True)
    assert record(app)["password_hash"] == stored


def test_a_link_expires(app, client, clock, alice) -> None:
    link = reset_link(app, client)
    clock.advance(app.config["PASSWORD_RESET_TIMEOUT"] - 1)
    assert client.get(path_of(link)).status_code == 200
    clock.advance(2)
    before = stored_bytes(app)
    assert client.get(path_of(link)).status_code == 404
    assert use_link(client, link).status_code == 404
    assert stored_bytes(app) == before


def test_asking_again_voids_the_earlier_link(app, client, alice) -> None:
    first = reset_link(app, client)
    second = reset_link(app, client)
    assert use_link(client, first).status_code == 404
    assert use_link(client, second).status_code == 303


def test_a_password_change_voids_the_link(app, client, alice) -> None:
    link = reset_link(app, client)
    actions = AuthActions(client)
    actions.login()
    assert actions.change_password().status_code == 302
    assert "Your password was changed" in body(outbox(app)[-1])  # the notice, sent
    before = stored_bytes(app)
    assert use_link(client, link).status_code == 404
    assert stored_bytes(app) == before


def test_a_verified_address_change_voids_the_link(app, client, alice) -> None:
    owner = app.test_client()  # alice's logged-in browser; ``client`` stays anonymous
    link = reset_link(app, client)
    AuthActions(owner).login()
    assert change_email(app, owner, "alice@new.example") == "pending"
    # Still live: until the new address is verified, the old one is the verified one.
    assert use_link(client, link).status_code == 303
    link = reset_link(app, client)
    AuthActions(owner).login("alice", NEW_PASSWORD)
    assert change_email(app, owner, "alice@new.example") == "pending"
    assert confirm(owner, link_of(last_to(app, "alice@new.example"))).status_code == 200
    before = stored_bytes(app)
    assert use_link(client, link).status_code == 404  # it went to the address no longer verified
    assert stored_bytes(app) == before


def test_a_link_for_one_user_does_nothing_to_another(app, client, alice) -> None:
    verified_user(app, client, "bob", "bob@example.org")
    link = reset_link(app, client)
    secret = path_of(link).rsplit(".", 1)[1]
    bob_uid = recovery.new_token("bob")[0].split(".")[0]
    before = stored_bytes(app)
    forged = f"/reset-password/{bob_uid}.{secret}"
    assert client.get(forged).status_code == 404
    assert use_link(client, forged).status_code == 404
    assert stored_bytes(app) == before


def test_a_truncated_or_altered_link_is_refused_and_changes_nothing(app, client, alice) -> None:
    link = reset_link(app, client)
    token = path_of(link).rsplit("/", 1)[1]
    before = stored_bytes(app)
    variants = {token[:n] for n in range(len(token))} | {token + "A"}
    for i, ch in enumerate(token):
        for other in sorted({"A", "a", "0", "-"} - {ch}):
            variants.add(token[:i] + other + token[i + 1 :])
            break
    for variant in sorted(variants):
        assert client.get(f"/reset-password/{variant}").status_code == 404, variant
        assert use_link(client, f"/reset-password/{variant}").status_code == 404, variant
    assert stored_bytes(app) == before
    assert use_link(client, link).status_code == 303  # the real one still works


def test_the_email_of_a_deleted_and_recreated_account_gets_nothing_live(app, client, alice) -> None:
    link = reset_link(app, client)
    actions = AuthActions(client)
    actions.login()
    client.post(
        "/delete-account",
        data={"password": PASSWORD, "csrf_token": csrf_token(client, "/account-details")},
    )
    assert record(app) is None
    assert actions.register("alice", OTHER_PASSWORD).status_code == 302
    before = stored_bytes(app)
    assert use_link(client, link).status_code == 404
    assert stored_bytes(app) == before


# -- sessions and the second factor ------------------------------------------------------------


def test_a_reset_ends_every_session_and_logs_nobody_in(app, client, alice) -> None:
    devices = [app.test_client(), app.test_client()]
    for device in devices:
        assert AuthActions(device).login().status_code == 302
        assert logged_in_as(device)
    link = reset_link(app, client)
    assert use_link(client, link).status_code == 303
    assert record(app)["sessions"] == {}
    assert not any(logged_in_as(device) for device in devices)
    assert not logged_in_as(client)


def test_a_reset_in_a_logged_in_browser_ends_that_session_too(app, client, alice) -> None:
    AuthActions(client).login()
    link = reset_link(app, client)
    assert use_link(client, link).status_code == 303
    assert not logged_in_as(client)


def give_factor(app, username: str = "alice") -> str:
    """Turn TOTP on in the record (set-up only: enrolment has its own tests); return the secret."""
    secret = mfa.new_secret()
    with app.app_context():
        fields, _ = mfa.enable_totp(username, secret, 0, 0)
        get_store().update(username, lambda r: r.update(fields))
    return secret


def test_a_reset_leaves_the_second_factor_in_place(app, client, alice) -> None:
    give_factor(app)
    factor = {k: record(app)[k] for k in ("totp", "recovery_codes")}
    link = reset_link(app, client)
    assert use_link(client, link).status_code == 303
    assert {k: record(app)[k] for k in ("totp", "recovery_codes")} == factor
    assert mfa.has_factor(record(app))


def test_after_a_reset_the_next_login_still_asks_for_the_second_factor(
    app, client, clock, alice
) -> None:
    secret = give_factor(app)
    link = reset_link(app, client)
    assert use_link(client, link).status_code == 303
    response = AuthActions(client).login("alice", NEW_PASSWORD)
    assert response.headers["Location"] == "/login/two-factor"
    assert not logged_in_as(client)  # the inbox and the new password alone are not enough
    code = mfa.code_at(secret, clock.step)
    second = client.post(
        "/login/two-factor", data={"code": code, "csrf_token": csrf_token(client, "/login")}
    )
    assert second.status_code == 302
    assert logged_in_as(client)


# -- verified email ---------------------------------------------------------------------------


def test_a_new_address_is_unverified_and_unused_until_its_link_is_pressed(app, client) -> None:
    actions = AuthActions(client)
    actions.register()
    actions.login()
    assert change_email(app, client, "alice@example.org") == "pending"
    msg = outbox(app)[-1]
    assert msg["To"] == "alice@example.org"
    assert msg["Subject"] == "Confirm your email address"
    link = link_of(msg)
    assert link.startswith("https://www.example.org/verify-email/")
    status = recovery.email_status(record(app))
    assert status == {"address": "alice@example.org", "verified": False, "pending": True}

    sent = len(outbox(app))
    ask_reset(app.test_client(), "alice@example.org")
    assert len(outbox(app)) == sent  # not used for recovery yet

    before = stored_bytes(app)
    page = client.get(path_of(link))  # a mail scanner's GET
    assert page.status_code == 200
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert 'id="confirm-email"' in page.get_data(as_text=True)
    assert stored_bytes(app) == before
    assert recovery.email_status(record(app))["verified"] is False

    assert confirm(client, link).status_code == 200
    assert recovery.email_status(record(app))["verified"] is True
    assert client.post(path_of(link), data={"csrf_token": csrf_token(client)}).status_code == 404


def test_changing_the_address_tells_the_old_one_and_keeps_it_until_the_new_is_verified(
    app, client, alice
) -> None:
    AuthActions(client).login()
    sent = len(outbox(app))
    assert change_email(app, client, "alice@new.example") == "pending"
    messages = outbox(app)[sent:]
    assert sorted(m["To"] for m in messages) == ["alice@example.org", "alice@new.example"]
    notice = next(m for m in messages if m["To"] == "alice@example.org")
    assert "new email address" in body(notice) and "From IP address: 127.0.0.1" in body(notice)
    assert "/verify-email/" not in body(notice)
    rec = record(app)
    assert rec["email"] == "alice@new.example" and rec["email_verified"] == "alice@example.org"
    sent = len(outbox(app))
    ask_reset(app.test_client(), "alice@example.org")
    assert outbox(app)[-1]["To"] == "alice@example.org" and len(outbox(app)) == sent + 1


def test_a_verification_link_dies_when_the_address_changes_again(app, client, alice) -> None:
    AuthActions(client).login()
    change_email(app, client, "first@example.org")
    first = link_of(last_to(app, "first@example.org"))
    change_email(app, client, "second@example.org")
    outbox(app)  # every message written
    before = stored_bytes(app)
    assert client.get(path_of(first)).status_code == 404
    assert client.post(path_of(first), data={"csrf_token": csrf_token(client)}).status_code == 404
    assert stored_bytes(app) == before


def test_a_verification_link_expires(app, client, clock) -> None:
    actions = AuthActions(client)
    actions.register()
    actions.login()
    change_email(app, client, "alice@example.org")
    link = link_of(outbox(app)[-1])
    clock.advance(app.config["EMAIL_VERIFY_TIMEOUT"] + 1)
    assert client.get(path_of(link)).status_code == 404


def test_removing_the_address_stops_recovery_and_tells_the_old_one(app, client, alice) -> None:
    AuthActions(client).login()
    sent = len(outbox(app))
    assert change_email(app, client, "") == "removed"
    assert [m["To"] for m in outbox(app)[sent:]] == ["alice@example.org"]
    sent = len(outbox(app))
    ask_reset(app.test_client(), "alice@example.org")
    assert len(outbox(app)) == sent


# -- the perimeter -----------------------------------------------------------------------------


def test_forms_need_csrf_and_a_form_body(app, client, alice) -> None:
    link = reset_link(app, client)
    before = stored_bytes(app)
    assert client.post("/forgot-password", data={"email": "alice@example.org"}).status_code == 400
    assert client.post(path_of(link), data={"password": NEW_PASSWORD}).status_code == 400
    assert client.post(path_of(link), json={"password": NEW_PASSWORD}).status_code == 415
    assert stored_bytes(app) == before
    assert len(outbox(app)) == 2  # alice's verification link and the one reset link


def test_forgot_password_is_limited_per_address_and_per_client(
    tmp_path, monkeypatch, clock
) -> None:
    app = two_factor_app(
        tmp_path,
        monkeypatch,
        RATELIMIT_ENABLED=True,
        FORGOT_PASSWORD_RATE_LIMIT_EMAIL="2 per hour",
        FORGOT_PASSWORD_RATE_LIMIT_IP="3 per hour",
    )
    client = app.test_client()

    def ask(address: str, ip: str) -> int:
        token = csrf_token(client, "/forgot-password")
        return client.post(
            "/forgot-password",
            data={"email": address, "csrf_token": token},
            environ_base={"REMOTE_ADDR": ip},
        ).status_code

    # One address from many clients: the third is refused, in any case of its ASCII letters.
    assert [ask("a@example.org", "10.0.0.1"), ask("a@example.org", "10.0.0.2")] == [200, 200]
    assert ask("A@EXAMPLE.ORG", "10.0.0.3") == 429
    # One client, many addresses: the fourth is refused.
    codes = [ask(f"x{i}@example.org", "10.0.0.9") for i in range(4)]
    assert codes == [200, 200, 200, 429]


def test_recovery_pages_have_the_layout_and_no_5xx_for_odd_tokens(app, client) -> None:
    for path in [
        "/reset-password/x",
        "/reset-password/" + "A" * 5000,
        "/verify-email/.",
        "/reset-password/YWxpY2U." + "A" * 43,
        "/reset-password/%00",
    ]:
        response = client.get(path)
        assert response.status_code == 404
        assert "skip-link" in response.get_data(as_text=True)


# -- boundaries and the parts the pages do not show ------------------------------------------


def test_a_link_still_works_in_its_last_second(app, client, clock, alice) -> None:
    link = reset_link(app, client)
    clock.advance(app.config["PASSWORD_RESET_TIMEOUT"])
    assert use_link(client, link).status_code == 303


@pytest.mark.parametrize(("timeout", "minutes"), [(3600, 60), (900, 15), (30, 1)])
def test_the_reset_mail_states_the_links_lifetime_in_whole_minutes(
    tmp_path, monkeypatch, clock, timeout, minutes
) -> None:
    app = two_factor_app(
        tmp_path,
        monkeypatch,
        PUBLIC_URL="https://www.example.org",
        PASSWORD_RESET_TIMEOUT=timeout,
    )
    client = app.test_client()
    verified_user(app, client, "alice", "alice@example.org")
    reset_link(app, client)
    assert f"within {minutes} minutes:" in body(outbox(app)[-1])


def test_send_reset_links_counts_each_matching_account_and_skips_the_rest(
    app, client, audit_events
) -> None:
    # The first accounts in the store do not match: the look-up goes on past them.
    verified_user(app, client, "aaron", "aaron@example.org")
    AuthActions(client).register("abel")  # no address at all
    verified_user(app, client, "alice", "shared@example.org")
    verified_user(app, client, "bob", "SHARED@example.org")
    sent = len(outbox(app))
    with app.app_context():
        assert recovery.send_reset_links("shared@example.org") == 2
        assert recovery.send_reset_links("nobody@example.org") == 0
        # An empty address matches nobody, not the accounts that have none.
        assert recovery.send_reset_links("") == 0
        assert recovery.send_reset_links("   ") == 0
    assert sorted(m["To"] for m in outbox(app)[sent:]) == [
        "SHARED@example.org",
        "shared@example.org",
    ]
    assert "password_reset" not in record(app, "abel")
    assert "password_reset" not in record(app, "aaron")
    sent_events = [e for e in audit_events() if e["event"] == "password_reset_sent"]
    assert sorted(e["username"] for e in sent_events) == ["alice", "bob"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {"address": "", "verified": False, "pending": False}),
        (
            {"email": "a@example.org"},
            {"address": "a@example.org", "verified": False, "pending": False},
        ),
        (
            {"email": "a@example.org", "email_verified": "a@example.org"},
            {"address": "a@example.org", "verified": True, "pending": False},
        ),
        (
            {"email": "a@example.org", "email_verify": {"address": "a@example.org"}},
            {"address": "a@example.org", "verified": False, "pending": True},
        ),
        (
            {"email": "b@example.org", "email_verify": {"address": "a@example.org"}},
            {"address": "b@example.org", "verified": False, "pending": False},
        ),
        (
            {"email": "", "email_verify": {"address": ""}},
            {"address": "", "verified": False, "pending": False},
        ),
    ],
)
def test_email_status_is_pending_only_for_a_link_sent_to_the_typed_address(
    fields, expected
) -> None:
    assert recovery.email_status(fields) == expected


def test_the_old_address_is_told_the_new_one_masked(app, client, alice) -> None:
    AuthActions(client).login()
    sent = len(outbox(app))
    change_email(app, client, "zoe.smith@new.example")
    notice = next(m for m in outbox(app)[sent:] if m["To"] == "alice@example.org")
    assert "The new address is z***@new.example." in body(notice)
    assert "zoe.smith" not in body(notice)


def test_an_address_change_is_an_event_on_the_security_page(app, client, alice) -> None:
    AuthActions(client).login()
    change_email(app, client, "alice@new.example")
    assert "Email address changed" in client.get("/security").get_data(as_text=True)


def test_a_forgot_password_post_without_an_email_field_is_a_form_error(
    tmp_path, monkeypatch, clock
) -> None:
    app = two_factor_app(tmp_path, monkeypatch, RATELIMIT_ENABLED=True)
    client = app.test_client()
    token = csrf_token(client, "/forgot-password")
    response = client.post("/forgot-password", data={"csrf_token": token})
    assert response.status_code == 422


def test_changing_back_to_the_verified_address_sends_nothing_and_kills_the_pending_link(
    app, client, alice, audit_events
) -> None:
    AuthActions(client).login()
    assert change_email(app, client, "alice@new.example") == "pending"
    pending_link = link_of(last_to(app, "alice@new.example"))
    sent = len(outbox(app))
    assert change_email(app, client, "alice@example.org") == "verified"
    assert len(outbox(app)) == sent  # no link, no notice
    rec = record(app)
    assert rec["email"] == rec["email_verified"] == "alice@example.org"
    assert "email_verify" not in rec
    assert client.get(path_of(pending_link)).status_code == 404
    requested = [e for e in audit_events() if e["event"] == "email_change_requested"]
    assert [(e["username"], e["outcome"]) for e in requested] == [
        ("alice", "pending"),
        ("alice", "verified"),
    ]


def test_the_mails_of_an_address_change_greet_the_account(app, client, alice) -> None:
    AuthActions(client).login()
    sent = len(outbox(app))
    change_email(app, client, "alice@new.example")
    for message in outbox(app)[sent:]:
        assert body(message).startswith("Hello alice,"), message["To"]


def test_a_change_of_case_only_is_verified_again_but_tells_the_old_address_nothing(
    app, client, alice
) -> None:
    AuthActions(client).login()
    sent = len(outbox(app))
    assert change_email(app, client, "Alice@Example.org") == "pending"
    assert [m["To"] for m in outbox(app)[sent:]] == ["Alice@Example.org"]


def test_a_first_address_tells_nobody_else(app, client) -> None:
    AuthActions(client).register()
    AuthActions(client).login()
    sent = len(outbox(app))
    assert change_email(app, client, "alice@example.org") == "pending"
    assert [m["To"] for m in outbox(app)[sent:]] == ["alice@example.org"]


def test_removing_the_address_notice_names_no_new_one(app, client, alice) -> None:
    AuthActions(client).login()
    sent = len(outbox(app))
    change_email(app, client, "")
    (notice,) = outbox(app)[sent:]
    assert "new address" not in body(notice) and "None" not in body(notice)
    assert "XXXX" not in body(notice)
    assert record(app)["email_verified"] is None


@pytest.mark.parametrize(
    "token",
    [
        None,
        123,
        "YWxpY2U",  # no dot, no secret
        "YWxpY2U.short",  # a secret of the wrong length
        "YWxpY2U." + "A" * 42 + "!",  # a character outside base64url
        "YWxpY2V." + "A" * 43,  # a second spelling of "alice" (base64's spare bits)
        "QUxJQ0U." + "A" * 43,  # "ALICE": not a username
        "!!!." + "A" * 43,
    ],
)
def test_token_user_refuses_every_malformed_token(token) -> None:
    assert recovery.token_user(token) is None


def test_token_user_reads_the_username_of_a_real_token() -> None:
    for name in ("alice", "bob", "a.b-c_d", "x" * 32):
        token, _ = recovery.new_token(name)
        assert recovery.token_user(token) == name


def test_an_address_changed_between_look_up_and_write_gets_no_link_and_the_rest_do(
    app, client, monkeypatch
) -> None:
    verified_user(app, client, "aaron", "shared@example.org")
    verified_user(app, client, "alice", "shared@example.org")
    with app.app_context():
        store = get_store()
        real_items = store.items

        def items_then_change():
            found = real_items()
            # The owner changes the address right after the look-up read it.
            store.update("aaron", lambda r: r.update(email_verified="new@example.org"))
            return found

        monkeypatch.setattr(store, "items", items_then_change)
        sent = len(outbox(app))
        assert recovery.send_reset_links("shared@example.org") == 1
    assert [m["To"] for m in outbox(app)[sent:]] == ["shared@example.org"]
    assert "password_reset" not in record(app, "aaron")
    assert "password_reset" in record(app, "alice")


# -- what the link handlers say, audit and record -------------------------------------------


def named(audit_events, *names: str) -> list[dict]:
    return [e for e in audit_events() if e["event"] in names]


def test_a_reset_says_so_on_the_login_page_is_audited_and_an_event(
    app, client, alice, audit_events
) -> None:
    link = reset_link(app, client)
    assert use_link(client, link).status_code == 303
    assert flashes(client) == [
        (
            "flash-success",
            "Your password has been reset and every device was logged out. Please log in.",
        )
    ]
    assert [e["username"] for e in named(audit_events, "password_reset")] == ["alice"]
    assert named(audit_events, "password_reset_refused") == []
    assert record(app)["events"][-1]["k"] == "password_reset"
    AuthActions(client).login("alice", NEW_PASSWORD)
    assert "Password reset with an email link" in client.get("/security").get_data(as_text=True)


def test_a_post_to_a_dead_link_is_audited_with_its_user_and_a_look_is_not(
    app, client, alice, audit_events
) -> None:
    link = reset_link(app, client)
    assert use_link(client, link).status_code == 303
    assert client.get(path_of(link)).status_code == 404
    assert named(audit_events, "password_reset_refused") == []
    assert use_link(client, link, OTHER_PASSWORD).status_code == 404
    (refused,) = named(audit_events, "password_reset_refused")
    assert refused["username"] == "alice" and "reason" not in refused


def test_a_new_password_made_of_the_username_is_refused_on_the_reset_page(app, client) -> None:
    # Strong on its own (test_passwords), guessable to anyone who knows the name.
    verified_user(app, client, "marmaladeskies", "m@example.org")
    link = reset_link(app, client, "m@example.org")
    before = stored_bytes(app)
    response = use_link(client, link, "marmaladeskies2024")
    assert response.status_code == 422
    assert stored_bytes(app) == before
    assert use_link(client, link).status_code == 303


def test_a_link_used_twice_at_once_resets_once_and_the_loser_is_audited(
    app, client, alice, audit_events, monkeypatch
) -> None:
    from test_races import _before_first_update

    link = reset_link(app, client)
    other = app.test_client()
    # The other browser uses the link while this request is about to write its password.
    done = _before_first_update(
        monkeypatch, app, lambda: use_link(other, link, OTHER_PASSWORD).status_code
    )
    response = use_link(client, link)
    assert done == [303]
    assert response.status_code == 404
    assert "This link does not work" in response.get_data(as_text=True)
    (refused,) = named(audit_events, "password_reset_refused")
    assert refused["username"] == "alice" and refused["reason"] == "changed meanwhile"
    assert [e["username"] for e in named(audit_events, "password_reset")] == ["alice"]
    assert AuthActions(app.test_client()).login("alice", OTHER_PASSWORD).status_code == 302


def test_forgot_password_asks_with_a_200_names_the_address_and_audits_no_user(
    app, client, alice, audit_events
) -> None:
    page = client.get("/forgot-password")
    assert page.status_code == 200
    response = ask_reset(client, "nobody@example.org")
    assert response.status_code == 200
    assert "verified address <strong>nobody@example.org</strong>" in response.get_data(as_text=True)
    # Asked, for an address: whose account it is (if any) is not for the log to say.
    assert [e["username"] for e in named(audit_events, "password_reset_asked")] == [None]


def test_a_verification_page_names_the_address_and_posts_back_to_its_own_link(app, client) -> None:
    AuthActions(client).register()
    AuthActions(client).login()
    change_email(app, client, "alice@example.org")
    path = path_of(link_of(last_to(app, "alice@example.org")))
    html = client.get(path).get_data(as_text=True)
    assert "Confirm that <strong>alice@example.org</strong> is yours." in html
    assert f'<form method="post" action="{path}"' in html


def test_a_verified_address_is_audited_and_an_event(app, client, audit_events) -> None:
    AuthActions(client).register()
    AuthActions(client).login()
    change_email(app, client, "alice@example.org")
    assert confirm(client, link_of(last_to(app, "alice@example.org"))).status_code == 200
    assert [e["username"] for e in named(audit_events, "email_verified")] == ["alice"]
    assert record(app)["events"][-1]["k"] == "email_verified"
    assert "Email address confirmed" in client.get("/security").get_data(as_text=True)


def test_the_reset_page_posts_back_to_its_own_link(app, client, alice) -> None:
    path = path_of(reset_link(app, client))
    refused = use_link(client, path, "short")  # the form again, with its error
    assert refused.status_code == 422
    for response in (client.get(path), refused):
        assert f'<form method="post" action="{path}"' in response.get_data(as_text=True)
