"""Passkeys: real WebAuthn ceremonies through the real handlers, and the attacks on them.

The authenticator is software (``SoftAuthenticator`` below): an EC P-256 key
made with ``cryptography``, authenticator data with the RP ID hash, flags
and sign count, a ``clientDataJSON``, a ``fmt: none`` attestation object in
CBOR, and ECDSA signatures, as a phone or a security key makes them. The
server checks them with py_webauthn; nothing is mocked.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import os
import re
import struct
import time
from base64 import urlsafe_b64decode, urlsafe_b64encode
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from test_recovery import outbox
from test_two_factor import two_factor_app

from helpers import OTHER_PASSWORD, AuthActions, csrf_token, make_app, stored_bytes
from secure_app import events, mfa, passkeys, passwords, two_factor
from secure_app.store import get_store

UP, UV, AT = 0x01, 0x04, 0x40
OPTIONS_RE = re.compile(r'data-options="([^"]*)"')


def b64(data: bytes) -> str:
    return urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SoftAuthenticator:
    """A passkey in software: one discoverable credential, user verification always on."""

    def __init__(self, *, counter: bool = True) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.credential_id = os.urandom(32)
        self.user_handle: str | None = None
        self.counter = counter  # False: a synced passkey, whose count stays 0
        self.count = 0

    def cose_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps(
            {
                1: 2,
                3: -7,
                -1: 1,
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )

    def _auth_data(self, rp_id: str, flags: int, count: int, attested: bytes = b"") -> bytes:
        return (
            hashlib.sha256(rp_id.encode()).digest()
            + bytes([flags])
            + struct.pack(">I", count)
            + attested
        )

    @staticmethod
    def _client_data(kind: str, challenge: str, origin: str) -> bytes:
        return json.dumps(
            {"type": kind, "challenge": challenge, "origin": origin, "crossOrigin": False}
        ).encode()

    def create(
        self, options: dict, origin: str, rp_id: str | None = None, *, flags: int = UP | UV | AT
    ) -> dict[str, Any]:
        """Answer ``navigator.credentials.create()`` as its ``toJSON()`` would."""
        self.user_handle = options["user"]["id"]
        client_data = self._client_data("webauthn.create", options["challenge"], origin)
        attested = bytes(16) + struct.pack(">H", len(self.credential_id)) + self.credential_id
        auth_data = self._auth_data(
            rp_id or options["rp"]["id"], flags, 0, attested + self.cose_key()
        )
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return {
            "id": b64(self.credential_id),
            "rawId": b64(self.credential_id),
            "type": "public-key",
            "authenticatorAttachment": "platform",
            "clientExtensionResults": {},
            "response": {
                "clientDataJSON": b64(client_data),
                "attestationObject": b64(attestation),
                "transports": ["internal"],
            },
        }

    def get(
        self,
        options: dict,
        origin: str,
        rp_id: str | None = None,
        *,
        count: int | None = None,
        flags: int = UP | UV,
    ) -> dict[str, Any]:
        """Answer ``navigator.credentials.get()``: sign authenticator data and the client data."""
        if count is None:
            if self.counter:
                self.count += 1
            count = self.count
        client_data = self._client_data("webauthn.get", options["challenge"], origin)
        auth_data = self._auth_data(rp_id or options["rpId"], flags, count)
        signed = auth_data + hashlib.sha256(client_data).digest()
        signature = self.key.sign(signed, ec.ECDSA(hashes.SHA256()))
        return {
            "id": b64(self.credential_id),
            "rawId": b64(self.credential_id),
            "type": "public-key",
            "authenticatorAttachment": "platform",
            "clientExtensionResults": {},
            "response": {
                "clientDataJSON": b64(client_data),
                "authenticatorData": b64(auth_data),
                "signature": b64(signature),
                "userHandle": self.user_handle,
            },
        }


# -- driving the pages ------------------------------------------------------------------------


def ceremony(response) -> tuple[dict, str, str]:
    """The options, the form's action and the CSRF token of a ceremony page."""
    assert response.status_code == 200, response.status_code
    page = response.get_data(as_text=True)
    options = json.loads(html.unescape(OPTIONS_RE.search(page).group(1)))
    action = re.search(r'action="([^"]+)" class="card" id="passkey-ceremony"', page).group(1)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    return options, html.unescape(action), token


FLASH_RE = re.compile(r'<p class="flash flash-([^"]*)">([^<]*)</p>')


def flashed(client, response) -> list[tuple[str, str]]:
    """The messages (category, text) on the page ``response`` redirects to."""
    assert response.status_code == 303, response.status_code
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    return [(category, html.unescape(text)) for category, text in FLASH_RE.findall(page)]


def shown(response) -> dict[str, str]:
    """What a ceremony page says: its mode, heading, prompt, form action and way back."""
    page = response.get_data(as_text=True)
    found = re.search(
        r"<h1>([^<]*)</h1>\s*<p>([^<]*)</p>.*?"
        r'action="([^"]*)" class="card" id="passkey-ceremony" data-ceremony="([^"]*)".*?'
        r'<p><a href="([^"]*)">Go back</a></p>',
        page,
        re.S,
    )
    title, prompt, action, mode, back = (html.unescape(g) for g in found.groups())
    return {"mode": mode, "title": title, "prompt": prompt, "action": action, "back": back}


def begin(client, url: str, page: str = "/login", **fields: str):
    return client.post(url, data={"csrf_token": csrf_token(client, page), **fields})


def finish(client, action: str, token: str, credential: object):
    value = credential if isinstance(credential, str) else json.dumps(credential)
    return client.post(action, data={"csrf_token": token, "credential": value})


def origin_of(app) -> str:
    return app.config["PUBLIC_URL"]


def enrol(client, authenticator: SoftAuthenticator, name: str = "Laptop"):
    options, action, token = ceremony(
        begin(client, "/security/passkeys/add", "/security", name=name)
    )
    return finish(
        client, action, token, authenticator.create(options, origin_of(client.application))
    )


def passkey_login(client, authenticator: SoftAuthenticator, **get_args: Any):
    options, action, token = ceremony(begin(client, "/login/passkey"))
    credential = authenticator.get(options, origin_of(client.application), **get_args)
    return finish(client, action, token, credential)


def who(client) -> str | None:
    with client.session_transaction() as s:
        return s.get("uid")


def record(app, name: str = "alice") -> dict:
    with app.app_context():
        return get_store().get(name)


def make_stale(client) -> None:
    with client.session_transaction() as s:
        s["auth_at"] = int(time.time()) - 3600


def log_out(client) -> None:
    client.post("/logout", data={"csrf_token": csrf_token(client, "/account-details")})
    assert who(client) is None


class AuditLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict] = []

    def emit(self, entry: logging.LogRecord) -> None:
        self.events.append(json.loads(entry.getMessage()))

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def of(self, kind: str, *fields: str) -> list[tuple]:
        """Each ``kind`` event as a tuple of its username and ``fields``."""
        return [
            (e["username"], *(e.get(f) for f in fields)) for e in self.events if e["event"] == kind
        ]


@pytest.fixture
def audit_lines():
    handler = AuditLines()
    logger = logging.getLogger("secure_app.audit")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def alice_key(logged_in) -> SoftAuthenticator:
    """alice, logged in, with one passkey on a software authenticator."""
    authenticator = SoftAuthenticator()
    response = enrol(logged_in, authenticator)
    assert response.status_code == 303 and response.headers["Location"] == "/security"
    return authenticator


def second_client_with_passkey(app, username: str = "bob") -> tuple[Any, SoftAuthenticator]:
    other = app.test_client()
    actions = AuthActions(other)
    assert actions.register(username, OTHER_PASSWORD).status_code == 302
    assert actions.login(username, OTHER_PASSWORD).status_code == 302
    authenticator = SoftAuthenticator()
    assert enrol(other, authenticator, "Bob's key").status_code == 303
    return other, authenticator


# -- the ceremonies ----------------------------------------------------------------------------


def test_registration_options_ask_for_a_verified_discoverable_passkey(logged_in):
    options, action, _ = ceremony(
        begin(logged_in, "/security/passkeys/add", "/security", name="Laptop")
    )
    assert action == "/security/passkeys/add/verify"
    assert options["rp"] == {"id": "localhost", "name": "secure_app"}
    assert options["attestation"] == "none"
    assert options["authenticatorSelection"]["residentKey"] == "required"
    assert options["authenticatorSelection"]["userVerification"] == "required"
    assert options["timeout"] == 60000
    assert len(unb64(options["challenge"])) * 8 >= 64
    assert b"alice" not in unb64(options["user"]["id"])  # the handle names nobody
    assert len(unb64(options["user"]["id"])) == 16  # random, as WebAuthn asks
    assert options["user"]["name"] == options["user"]["displayName"] == "alice"
    # In order of preference: ES256 first, which every authenticator has.
    assert [p["alg"] for p in options["pubKeyCredParams"]] == [-7, -8, -257]


def test_register_stores_the_passkey_and_lists_it(logged_in, alice_key):
    stored = record(logged_in.application)
    [key] = stored["passkeys"]
    assert key["id"] == b64(alice_key.credential_id)
    assert key["name"] == "Laptop" and key["transports"] == ["internal"]
    assert key["sign_count"] == 0 and key["last_used"] == 0
    assert abs(key["created"] - time.time()) < 60
    assert unb64(stored["webauthn_user"]) and stored["webauthn_user"] == alice_key.user_handle
    assert mfa.has_factor(stored) and not mfa.has_totp(stored)
    page = logged_in.get("/security").get_data(as_text=True)
    assert "Laptop" in page and 'id="add-passkey"' in page and 'id="passkey-name"' in page
    # A second passkey's options exclude the first: one device cannot enrol twice.
    options, _, _ = ceremony(begin(logged_in, "/security/passkeys/add", "/security", name="Phone"))
    assert [c["id"] for c in options["excludeCredentials"]] == [key["id"]]
    assert options["user"]["id"] == stored["webauthn_user"]  # one handle for all of alice's


def test_sign_in_with_the_passkey_alone(app, logged_in, alice_key):
    log_out(logged_in)
    response = passkey_login(logged_in, alice_key)
    assert response.status_code == 303 and response.headers["Location"] == "/account-details"
    assert who(logged_in) == "alice"
    assert "Logged in as" in logged_in.get("/account-details").get_data(as_text=True)
    [key] = record(app)["passkeys"]
    assert key["sign_count"] == 1 and key["last_used"] > 0
    # The login is a fresh authentication: sensitive pages need no re-authentication.
    assert logged_in.get("/security/totp").status_code == 200


def test_passkey_login_keeps_a_same_site_next(logged_in, alice_key):
    log_out(logged_in)
    options, action, token = ceremony(begin(logged_in, "/login/passkey?next=/security"))
    credential = alice_key.get(options, origin_of(logged_in.application))
    assert finish(logged_in, action, token, credential).headers["Location"] == "/security"


def test_a_password_login_then_asks_for_the_passkey_as_second_step(app, logged_in, alice_key):
    log_out(logged_in)
    response = AuthActions(logged_in).login()
    assert response.headers["Location"] == "/login/two-factor" and who(logged_in) is None
    page = logged_in.get("/login/two-factor").get_data(as_text=True)
    assert 'id="passkey-second-factor"' in page
    options, action, token = ceremony(
        begin(logged_in, "/login/two-factor/passkey", "/login/two-factor")
    )
    assert [c["id"] for c in options["allowCredentials"]] == [b64(alice_key.credential_id)]
    response = finish(logged_in, action, token, alice_key.get(options, origin_of(app)))
    assert response.status_code == 303 and response.headers["Location"] == "/account-details"
    assert who(logged_in) == "alice"


def test_passkey_second_step_for_a_user_with_totp_too(app, logged_in, alice_key):
    with app.app_context():
        fields, _ = mfa.enable_totp("alice", mfa.new_secret(), 0, int(time.time()))
        get_store().update("alice", lambda r: r.update(fields))
    log_out(logged_in)
    AuthActions(logged_in).login()
    page = logged_in.get("/login/two-factor").get_data(as_text=True)
    assert 'name="code"' in page and 'id="passkey-second-factor"' in page
    options, action, token = ceremony(
        begin(logged_in, "/login/two-factor/passkey", "/login/two-factor")
    )
    finish(logged_in, action, token, alice_key.get(options, origin_of(app)))
    assert who(logged_in) == "alice"


def test_reauthenticate_with_a_passkey(app, logged_in, alice_key):
    make_stale(logged_in)
    assert logged_in.get("/security/totp").status_code == 303
    page = logged_in.get("/reauthenticate?next=/security/totp").get_data(as_text=True)
    assert 'id="passkey-reauthenticate"' in page
    options, action, token = ceremony(
        begin(logged_in, "/reauthenticate/passkey?next=/security/totp", "/security")
    )
    # The browser offers alice's own passkeys only.
    assert [c["id"] for c in options["allowCredentials"]] == [b64(alice_key.credential_id)]
    response = finish(logged_in, action, token, alice_key.get(options, origin_of(app)))
    assert response.status_code == 303 and response.headers["Location"] == "/security/totp"
    assert logged_in.get("/security/totp").status_code == 200


def test_rename_then_remove_and_the_passkey_no_longer_signs_in(app, logged_in, alice_key):
    key_id = b64(alice_key.credential_id)
    token = csrf_token(logged_in, "/security")
    response = logged_in.post(
        "/security/passkeys/rename",
        data={"csrf_token": token, "passkey": key_id, "name": " Work  laptop "},
    )
    assert response.status_code == 303
    assert record(app)["passkeys"][0]["name"] == "Work laptop"
    response = logged_in.post(
        "/security/passkeys/remove", data={"csrf_token": token, "passkey": key_id}
    )
    assert response.status_code == 303
    assert record(app)["passkeys"] == []
    log_out(logged_in)
    before = stored_bytes(app)
    response = passkey_login(logged_in, alice_key)
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert who(logged_in) is None and stored_bytes(app) == before


def test_changes_need_a_recent_authentication(app, logged_in, alice_key):
    make_stale(logged_in)
    before = stored_bytes(app)
    token = csrf_token(logged_in, "/security")
    key_id = b64(alice_key.credential_id)
    for url, fields in [
        ("/security/passkeys/add", {"name": "Another"}),
        ("/security/passkeys/rename", {"passkey": key_id, "name": "x"}),
        ("/security/passkeys/remove", {"passkey": key_id}),
    ]:
        response = logged_in.post(url, data={"csrf_token": token, **fields})
        assert response.status_code == 303 and "/reauthenticate" in response.headers["Location"]
    assert stored_bytes(app) == before


def test_reset_two_factor_removes_passkeys(app, logged_in, alice_key):
    result = app.test_cli_runner().invoke(args=["reset-two-factor", "alice"])
    assert result.exit_code == 0, result.output
    assert "passkeys" not in record(app) and not mfa.has_factor(record(app))


def test_disabling_totp_keeps_the_passkeys(app, logged_in, alice_key):
    with app.app_context():
        fields, _ = mfa.enable_totp("alice", mfa.new_secret(), 0, int(time.time()))
        get_store().update("alice", lambda r: r.update(fields))
    token = csrf_token(logged_in, "/security")
    assert logged_in.post("/security/totp/disable", data={"csrf_token": token}).status_code == 303
    assert not mfa.has_totp(record(app)) and len(record(app)["passkeys"]) == 1


# -- attacks: each refused, none a 5xx, nothing changed ---------------------------------------


def refused_login(app, client, response, before) -> None:
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert who(client) is None
    assert stored_bytes(app) == before


def test_a_replayed_assertion_is_refused(app, logged_in, alice_key):
    log_out(logged_in)
    options, action, token = ceremony(begin(logged_in, "/login/passkey"))
    credential = alice_key.get(options, origin_of(app))
    assert finish(logged_in, action, token, credential).headers["Location"] == "/account-details"
    log_out(logged_in)
    before = stored_bytes(app)
    token = csrf_token(logged_in)
    refused_login(app, logged_in, finish(logged_in, action, token, credential), before)


@pytest.mark.parametrize("later", [0, passkeys.TIMEOUT])
def test_a_replayed_cookie_with_its_answered_challenge_is_refused(clock, app, client, later):
    # A synced passkey's count stays 0, so only the spent challenge stops this replay; the
    # record remembers it to the last second the challenge is live (drawn and answered at once).
    auth = AuthActions(client)
    auth.register()
    auth.login()
    key = SoftAuthenticator(counter=False)
    enrol(client, key)
    log_out(client)
    options, action, token = ceremony(begin(client, "/login/passkey"))
    cookie_name = app.config["SESSION_COOKIE_NAME"]
    saved = client.get_cookie(cookie_name).value
    credential = key.get(options, origin_of(app))
    assert finish(client, action, token, credential).headers["Location"] == "/account-details"
    log_out(client)
    clock.advance(later)
    before = stored_bytes(app)
    client.set_cookie(cookie_name, saved)  # the cookie from before, challenge and all
    refused_login(app, client, finish(client, action, token, credential), before)


@pytest.mark.parametrize(
    "origin, rp_id",
    [
        ("https://evil.example", None),
        ("http://localhost:8001", None),
        (None, "evil.example"),
        ("https://evil.example", "evil.example"),
    ],
)
def test_an_assertion_for_another_origin_or_rp_id_is_refused(
    app, logged_in, alice_key, origin, rp_id
):
    log_out(logged_in)
    before = stored_bytes(app)
    options, action, token = ceremony(begin(logged_in, "/login/passkey"))
    credential = alice_key.get(options, origin or origin_of(app), rp_id)
    refused_login(app, logged_in, finish(logged_in, action, token, credential), before)


def test_a_registration_for_another_origin_or_rp_id_is_refused(app, logged_in):
    for origin, rp_id in [("https://evil.example", None), (None, "evil.example")]:
        before = stored_bytes(app)
        options, action, token = ceremony(
            begin(logged_in, "/security/passkeys/add", "/security", name="Laptop")
        )
        credential = SoftAuthenticator().create(options, origin or origin_of(app), rp_id)
        response = finish(logged_in, action, token, credential)
        assert response.status_code == 303 and stored_bytes(app) == before
        assert "passkeys" not in record(app)


def test_a_challenge_works_once(app, logged_in, alice_key):
    log_out(logged_in)
    options, action, token = ceremony(begin(logged_in, "/login/passkey"))
    first = alice_key.get(options, origin_of(app))
    second = alice_key.get(options, origin_of(app))  # a later count, the same challenge
    assert finish(logged_in, action, token, first).headers["Location"] == "/account-details"
    log_out(logged_in)
    before = stored_bytes(app)
    refused_login(app, logged_in, finish(logged_in, action, csrf_token(logged_in), second), before)


def test_a_challenge_expires_after_the_timeout(app, logged_in, alice_key):
    log_out(logged_in)
    options, action, token = ceremony(begin(logged_in, "/login/passkey"))
    with logged_in.session_transaction() as s:
        state = dict(s[passkeys.CEREMONY])
        state["t"] -= passkeys.TIMEOUT + 1
        s[passkeys.CEREMONY] = state  # as a cookie from a minute ago holds it
    before = stored_bytes(app)
    refused_login(
        app,
        logged_in,
        finish(logged_in, action, token, alice_key.get(options, origin_of(app))),
        before,
    )


def test_a_challenge_is_bound_to_its_ceremony(app, logged_in, alice_key):
    # Options drawn for re-authentication cannot be answered to the sign-in.
    options, _, token = ceremony(begin(logged_in, "/reauthenticate/passkey", "/security"))
    log_out(logged_in)
    before = stored_bytes(app)
    response = finish(
        logged_in,
        "/login/passkey/verify",
        csrf_token(logged_in),
        alice_key.get(options, origin_of(app)),
    )
    refused_login(app, logged_in, response, before)


def test_user_verification_is_required(app, logged_in, alice_key):
    log_out(logged_in)
    before = stored_bytes(app)
    refused_login(app, logged_in, passkey_login(logged_in, alice_key, flags=UP), before)


def test_another_users_passkey_is_refused_in_the_second_step(app, logged_in, alice_key):
    _, bob_key = second_client_with_passkey(app)
    log_out(logged_in)
    AuthActions(logged_in).login()
    options, action, token = ceremony(
        begin(logged_in, "/login/two-factor/passkey", "/login/two-factor")
    )
    before = stored_bytes(app)
    for handle in (bob_key.user_handle, alice_key.user_handle):
        bob_key.user_handle = handle  # bob's key, with bob's handle and then with alice's
        response = finish(logged_in, action, token, bob_key.get(options, origin_of(app)))
        assert response.status_code == 303 and response.headers["Location"] == "/login/two-factor"
        assert who(logged_in) is None and stored_bytes(app) == before
        options, action, token = ceremony(
            begin(logged_in, "/login/two-factor/passkey", "/login/two-factor")
        )


def test_a_lowered_sign_count_is_refused_and_audited(app, logged_in, alice_key, audit_lines):
    log_out(logged_in)
    assert passkey_login(logged_in, alice_key, count=5).headers["Location"] == "/account-details"
    log_out(logged_in)
    before = stored_bytes(app)
    for count in (3, 5):  # lower, and the same again
        refused_login(app, logged_in, passkey_login(logged_in, alice_key, count=count), before)
    lowered = [e for e in audit_lines.events if e["event"] == "passkey_sign_count_lowered"]
    assert [(e["stored"], e["presented"]) for e in lowered] == [(5, 3), (5, 5)]


def test_reauthentication_refuses_another_users_passkey(app, logged_in, alice_key):
    """Flask-Security-Too GHSA-f66q-9rf6-8795: the credential must be the logged-in user's."""
    _, bob_key = second_client_with_passkey(app)
    make_stale(logged_in)
    options, action, token = ceremony(
        begin(logged_in, "/reauthenticate/passkey?next=/security", "/security")
    )
    before = stored_bytes(app)
    credential = bob_key.get(options, origin_of(app))  # a real, valid signature: bob's
    response = finish(logged_in, action, token, credential)
    assert response.status_code == 303 and "/reauthenticate" in response.headers["Location"]
    assert logged_in.get("/security/totp").status_code == 303  # still not re-authenticated
    assert stored_bytes(app) == before


def test_a_passkey_sign_in_with_an_unknown_handle_or_credential_is_refused(
    app, logged_in, alice_key
):
    log_out(logged_in)
    stranger = SoftAuthenticator()
    stranger.user_handle = alice_key.user_handle  # alice's handle, an unknown credential
    before = stored_bytes(app)
    refused_login(app, logged_in, passkey_login(logged_in, stranger), before)
    stranger.user_handle = b64(os.urandom(16))
    refused_login(app, logged_in, passkey_login(logged_in, stranger), before)


def test_the_write_after_a_check_refuses_a_passkey_removed_or_used_meanwhile():
    key = {"id": "abc", "public_key": "x", "sign_count": 3, "last_used": 0}
    record = {"username": "alice", "password_hash": "h", "passkeys": [key]}
    original = json.loads(json.dumps(record))
    claim = passkeys._claim("abc", 3, 4, "challenge", 1000)
    assert claim({**record, "passkeys": []}) is None  # removed meanwhile
    assert claim({**record, "passkeys": [{**key, "sign_count": 4}]}) is None  # used meanwhile
    done = claim(record)
    assert done["passkeys"] == [{**key, "sign_count": 4, "last_used": 1000}]
    assert record == original  # the record it was given is not changed in place
    assert claim({**done, "passkeys": [key]}) is None  # the same challenge, answered again


def test_ceremonies_need_the_csrf_token(app, logged_in, alice_key):
    before = stored_bytes(app)
    for url in (
        "/login/passkey",
        "/login/passkey/verify",
        "/security/passkeys/add",
        "/security/passkeys/remove",
    ):
        assert logged_in.post(url, data={"credential": "{}"}).status_code == 400
    assert logged_in.post("/login/passkey/verify", json={"credential": {}}).status_code == 415
    assert stored_bytes(app) == before


# -- garbage in the credential field ----------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
CREDENTIAL_KEYS = [
    "id",
    "rawId",
    "type",
    "response",
    "clientDataJSON",
    "authenticatorData",
    "signature",
    "userHandle",
    "attestationObject",
    "transports",
]


@st.composite
def garbage_credentials(draw) -> str:
    """Text, JSON of any shape, or a real-looking credential with fields replaced."""
    kind = draw(st.sampled_from(["text", "json", "shaped"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "json":
        return json.dumps(draw(JSON_VALUES))
    fields = {k: draw(st.sampled_from(["AAAA", "", "!!", "x" * 70])) for k in CREDENTIAL_KEYS[:3]}
    response = draw(
        st.dictionaries(
            st.sampled_from(CREDENTIAL_KEYS),
            JSON_VALUES | st.sampled_from(["AAAA", "_-_-", "="]),
            max_size=6,
        )
    )
    return json.dumps({**fields, "type": "public-key", "response": response})


@pytest.fixture
def garbage_clients(app, logged_in, alice_key) -> dict[str, Any]:
    """Clients at each verify step: anonymous, pending second step, logged in (set up once)."""
    anonymous = app.test_client()
    pending = app.test_client()
    assert AuthActions(pending).login().headers["Location"] == "/login/two-factor"
    return {"login": anonymous, "second": pending, "reauth": logged_in, "add": logged_in}


BEGIN = {
    "login": ("/login/passkey", "/login", {}),
    "second": ("/login/two-factor/passkey", "/login/two-factor", {}),
    "reauth": ("/reauthenticate/passkey", "/security", {}),
    "add": ("/security/passkeys/add", "/security", {"name": "x"}),
}


@given(value=garbage_credentials(), where=st.sampled_from(sorted(BEGIN)))
def test_garbage_credentials_are_refused_without_a_5xx(app, garbage_clients, value, where):
    client = garbage_clients[where]
    url, page, fields = BEGIN[where]
    _, action, token = ceremony(begin(client, url, page, **fields))
    before = stored_bytes(app)
    uid = who(client)
    response = finish(client, action, token, value)
    assert response.status_code == 303, response.status_code
    assert stored_bytes(app) == before and who(client) == uid


# -- the parts each attack above does not reach on its own -----------------------------------


def test_a_counting_authenticator_that_presents_zero_is_refused(
    app, logged_in, alice_key, audit_lines
):
    # Zero is what a synced passkey always sends; after a real count it is a clone's answer.
    log_out(logged_in)
    assert passkey_login(logged_in, alice_key, count=2).headers["Location"] == "/account-details"
    log_out(logged_in)
    before = stored_bytes(app)
    refused_login(app, logged_in, passkey_login(logged_in, alice_key, count=0), before)
    lowered = [e for e in audit_lines.events if e["event"] == "passkey_sign_count_lowered"]
    assert [(e["username"], e["stored"], e["presented"]) for e in lowered] == [("alice", 2, 0)]


def test_a_bad_signature_is_refused_and_audited_with_the_error(
    app, logged_in, alice_key, audit_lines
):
    log_out(logged_in)
    options, action, token = ceremony(begin(logged_in, "/login/passkey"))
    credential = alice_key.get(options, origin_of(app))
    signature = bytearray(unb64(credential["response"]["signature"]))
    signature[-1] ^= 1
    credential["response"]["signature"] = b64(bytes(signature))
    before = stored_bytes(app)
    refused_login(app, logged_in, finish(logged_in, action, token, credential), before)
    refused = [e for e in audit_lines.events if e["event"] == "passkey_refused"]
    assert len(refused) == 1 and refused[0]["username"] == "alice"
    assert refused[0]["reason"] == "InvalidAuthenticationResponse"


def test_a_refused_claim_changes_nothing_and_a_granted_one_replaces_the_record():
    record = {"username": "alice", "passkeys": [{"id": "abc"}]}
    assert passkeys._as_change(lambda r: None)(record) is False
    assert record == {"username": "alice", "passkeys": [{"id": "abc"}]}
    claimed = {"username": "alice", "passkeys": [{"id": "abc", "last_used": 5}]}
    assert passkeys._as_change(lambda r: claimed)(record) is True
    assert record == claimed


def test_a_user_handle_is_found_in_one_look_up_never_a_pass_over_every_record(
    app, logged_in, alice_key, monkeypatch
):
    """The live attack on issue 18: an unknown handle cost one read per account, per request."""
    log_out(logged_in)
    with app.app_context():
        store = get_store()
    passes: list[str] = []
    real_keys, real_find = store.keys, store.find
    monkeypatch.setattr(store, "keys", lambda: passes.append("keys") or real_keys())
    monkeypatch.setattr(
        store, "find", lambda field, value: passes.append(field) or real_find(field, value)
    )
    assert passkey_login(logged_in, alice_key).headers["Location"] == "/account-details"
    assert passes == ["webauthn_user"]
    # The account is deleted: its handle names nobody now, and nothing breaks.
    log_out(logged_in)
    with app.app_context():
        assert get_store().delete("alice")
    before = stored_bytes(app)
    refused_login(app, logged_in, passkey_login(logged_in, alice_key), before)
    assert passes == ["webauthn_user", "webauthn_user"]


def test_rename_and_remove_name_the_passkey_and_refuse_an_unknown_one(app, logged_in, alice_key):
    key_id = b64(alice_key.credential_id)
    token = csrf_token(logged_in, "/security")
    before = stored_bytes(app)
    for url, fields in [
        ("/security/passkeys/rename", {"passkey": "AAAA", "name": "x"}),
        ("/security/passkeys/remove", {"passkey": "AAAA"}),
    ]:
        response = logged_in.post(url, data={"csrf_token": token, **fields})
        assert response.status_code == 303
        page = logged_in.get("/security").get_data(as_text=True)
        assert "That passkey is not on this account any more." in page
    assert stored_bytes(app) == before
    logged_in.post("/security/passkeys/remove", data={"csrf_token": token, "passkey": key_id})
    page = logged_in.get("/security").get_data(as_text=True)
    assert "Passkey \u201cLaptop\u201d removed. It no longer signs in." in page
    assert "Passkey removed" in page  # the recent-events list
    kinds = [(e["k"], e.get("name")) for e in record(app)["events"]]
    assert ("passkey_removed", "Laptop") in kinds


def test_a_user_with_totp_too_can_rename_a_passkey(app, logged_in, alice_key):
    with app.app_context():
        fields, _ = mfa.enable_totp("alice", mfa.new_secret(), 0, int(time.time()))
        get_store().update("alice", lambda r: r.update(fields))
    token = csrf_token(logged_in, "/security")
    response = logged_in.post(
        "/security/passkeys/rename",
        data={"csrf_token": token, "passkey": b64(alice_key.credential_id), "name": "Phone"},
    )
    assert response.status_code == 303
    assert record(app)["passkeys"][0]["name"] == "Phone"


def test_the_sign_in_page_asks_for_a_verified_passkey_within_the_challenges_life(app, client):
    response = begin(client, "/login/passkey")
    options, _, _ = ceremony(response)
    assert options["timeout"] == passkeys.TIMEOUT * 1000  # milliseconds
    assert options["userVerification"] == "required"
    assert shown(response) == {
        "mode": "get",
        "title": "Sign in with a passkey",
        "prompt": "Use the passkey for this site: your device will ask for your fingerprint, "
        "face, PIN or security key.",
        "action": "/login/passkey/verify",
        "back": "/login",
    }


def test_refusals_of_an_assertion_are_audited_with_the_user_and_why(
    app, logged_in, alice_key, audit_lines
):
    _, bob_key = second_client_with_passkey(app)
    make_stale(logged_in)
    options, action, token = ceremony(
        begin(logged_in, "/reauthenticate/passkey?next=/security", "/security")
    )
    finish(logged_in, action, token, bob_key.get(options, origin_of(app)))
    token = csrf_token(logged_in, "/security")
    finish(logged_in, action, token, alice_key.get(options, origin_of(app)))  # challenge spent
    refused = [
        (e["username"], e["reason"]) for e in audit_lines.events if e["event"] == "passkey_refused"
    ]
    assert refused == [("alice", "not a passkey of this user"), ("alice", "no live challenge")]


@pytest.mark.parametrize("handle", ["", None])
def test_an_assertion_without_a_user_handle_is_checked_by_its_credential(
    app, logged_in, alice_key, handle
):
    # Authenticators may leave the handle out (null or empty) outside discoverable sign-in.
    make_stale(logged_in)
    options, action, token = ceremony(
        begin(logged_in, "/reauthenticate/passkey?next=/security", "/security")
    )
    credential = alice_key.get(options, origin_of(app))
    credential["response"]["userHandle"] = handle
    response = finish(logged_in, action, token, credential)
    assert response.status_code == 303 and response.headers["Location"] == "/security"


@pytest.mark.parametrize("handle", [5, ["x"], "A" * 128])
def test_an_assertion_with_a_foreign_or_malformed_handle_is_refused(
    app, logged_in, alice_key, handle
):
    make_stale(logged_in)
    options, action, token = ceremony(
        begin(logged_in, "/reauthenticate/passkey?next=/security", "/security")
    )
    credential = alice_key.get(options, origin_of(app))
    credential["response"]["userHandle"] = handle
    before = stored_bytes(app)
    response = finish(logged_in, action, token, credential)
    assert response.status_code == 303 and "/reauthenticate" in response.headers["Location"]
    assert stored_bytes(app) == before


def test_an_assertion_whose_response_is_not_an_object_is_refused(app, logged_in, alice_key):
    log_out(logged_in)
    options, action, token = ceremony(begin(logged_in, "/login/passkey"))
    credential = alice_key.get(options, origin_of(app))
    credential["response"] = "not an object"
    before = stored_bytes(app)
    refused_login(app, logged_in, finish(logged_in, action, token, credential), before)


def test_a_challenge_still_works_in_its_last_second(clock, app, logged_in, alice_key):
    log_out(logged_in)
    options, action, token = ceremony(begin(logged_in, "/login/passkey"))
    clock.advance(passkeys.TIMEOUT)
    response = finish(logged_in, action, token, alice_key.get(options, origin_of(app)))
    assert response.headers["Location"] == "/account-details"


def test_answered_challenges_are_forgotten_once_they_could_not_be_replayed(
    clock, app, logged_in, alice_key
):
    # The record keeps only the answered challenges that are still live: it does not grow.
    for _ in range(3):
        log_out(logged_in)
        assert passkey_login(logged_in, alice_key).headers["Location"] == "/account-details"
        clock.advance(passkeys.TIMEOUT + 1)
    assert len(record(app)["passkey_challenges"]) == 1


def test_a_refused_passkey_change_is_shown_as_an_error(app, logged_in, alice_key):
    token = csrf_token(logged_in, "/security")
    logged_in.post("/security/passkeys/remove", data={"csrf_token": token, "passkey": "AAAA"})
    page = logged_in.get("/security").get_data(as_text=True)
    assert '<p class="flash flash-error">That passkey is not on this account any more.</p>' in page


def test_the_security_page_lists_each_passkey_with_its_name_id_and_dates(app, logged_in, alice_key):
    key_id = b64(alice_key.credential_id)
    stored = record(app)["passkeys"][0]
    page = logged_in.get("/security").get_data(as_text=True)
    assert '<strong class="passkey-name">Laptop</strong>' in page
    assert page.count(f'name="passkey" value="{key_id}"') == 2  # rename and remove
    assert f"Added {events.when(stored['created'])}; last used never." in page
    log_out(logged_in)
    assert passkey_login(logged_in, alice_key).headers["Location"] == "/account-details"
    used = record(app)["passkeys"][0]["last_used"]
    page = logged_in.get("/security").get_data(as_text=True)
    assert f"; last used {events.when(used)}." in page


# -- what each ceremony says, records, audits and mails ----------------------------------------


def verified_address(app, name: str = "alice") -> str:
    """Give ``name`` a verified address, as the recovery flow leaves it; return it."""
    address = f"{name}@example.org"
    with app.app_context():
        get_store().update(name, lambda r: r.update(email=address, email_verified=address))
    return address


def notices_to(app, address: str) -> list[str]:
    return [m["Subject"] for m in outbox(app) if m["To"] == address]


def test_each_ceremony_page_says_what_it_asks_for_and_where_back_goes(app, logged_in, alice_key):
    assert shown(begin(logged_in, "/security/passkeys/add", "/security", name="Phone")) == {
        "mode": "create",
        "title": "Add a passkey",
        "prompt": "Your device will now make a passkey named \u201cPhone\u201d for this site.",
        "action": "/security/passkeys/add/verify",
        "back": "/security",
    }
    assert shown(begin(logged_in, "/reauthenticate/passkey?next=/security/totp", "/security")) == {
        "mode": "get",
        "title": "Confirm it is you",
        "prompt": "Use your passkey to confirm it is you.",
        "action": "/reauthenticate/passkey/verify",
        "back": "/reauthenticate?next=/security/totp",
    }
    log_out(logged_in)
    AuthActions(logged_in).login()
    assert shown(begin(logged_in, "/login/two-factor/passkey", "/login/two-factor")) == {
        "mode": "get",
        "title": "Two-step sign-in",
        "prompt": "Your password was right. Now use your passkey.",
        "action": "/login/two-factor/passkey/verify",
        "back": "/login/two-factor",
    }


def test_adding_a_passkey_is_confirmed_audited_mailed_and_recorded(app, logged_in, audit_lines):
    address = verified_address(app)
    response = enrol(logged_in, SoftAuthenticator(), "Work laptop")
    assert flashed(logged_in, response) == [("success", "Passkey \u201cWork laptop\u201d added.")]
    assert audit_lines.of("passkey_added") == [("alice",)]
    assert notices_to(app, address) == ["Security notice: a passkey was added to your account"]
    assert ("passkey_added", "Work laptop") in [
        (e["k"], e.get("name")) for e in record(app)["events"]
    ]


def test_a_second_passkey_is_added_beside_the_first_and_both_sign_in(app, logged_in, alice_key):
    phone = SoftAuthenticator()
    response = enrol(logged_in, phone, "Phone")
    assert flashed(logged_in, response) == [("success", "Passkey \u201cPhone\u201d added.")]
    stored = record(app)
    assert [k["name"] for k in stored["passkeys"]] == ["Laptop", "Phone"]
    assert phone.user_handle == alice_key.user_handle == stored["webauthn_user"]
    for key in (alice_key, phone):
        log_out(logged_in)
        assert passkey_login(logged_in, key).headers["Location"] == "/account-details"


def test_a_registration_without_a_live_challenge_or_a_credential_is_refused(
    clock, app, logged_in, audit_lines
):
    options, action, token = ceremony(
        begin(logged_in, "/security/passkeys/add", "/security", name="x")
    )
    credential = SoftAuthenticator().create(options, origin_of(app))
    assert flashed(logged_in, finish(logged_in, action, token, credential))[0][0] == "success"
    before = stored_bytes(app)
    response = finish(logged_in, action, token, credential)  # its challenge was taken
    assert flashed(logged_in, response) == [("error", "That took too long. Please try again.")]
    _, action, token = ceremony(begin(logged_in, "/security/passkeys/add", "/security", name="x"))
    response = finish(logged_in, action, token, "")
    assert flashed(logged_in, response) == [
        ("error", "That passkey did not work. Please try again.")
    ]
    options, action, token = ceremony(
        begin(logged_in, "/security/passkeys/add", "/security", name="x")
    )
    clock.advance(passkeys.TIMEOUT + 1)
    response = finish(logged_in, action, token, SoftAuthenticator().create(options, origin_of(app)))
    assert flashed(logged_in, response) == [("error", "That took too long. Please try again.")]
    assert audit_lines.of("passkey_add_refused", "reason") == 3 * [
        ("alice", "no live challenge or no credential")
    ]
    assert stored_bytes(app) == before


def test_a_registration_without_user_verification_is_refused(app, logged_in, audit_lines):
    options, action, token = ceremony(
        begin(logged_in, "/security/passkeys/add", "/security", name="x")
    )
    before = stored_bytes(app)
    credential = SoftAuthenticator().create(options, origin_of(app), flags=UP | AT)
    response = finish(logged_in, action, token, credential)
    assert flashed(logged_in, response) == [("error", passkeys.REFUSED)]
    assert audit_lines.of("passkey_add_refused", "reason") == [
        ("alice", "InvalidRegistrationResponse")
    ]
    assert stored_bytes(app) == before


def test_a_credential_id_of_up_to_1023_bytes_is_taken_and_a_longer_one_refused(
    app, logged_in, audit_lines
):
    # WebAuthn's own limit; py_webauthn does not check it.
    longest, too_long = SoftAuthenticator(), SoftAuthenticator()
    longest.credential_id, too_long.credential_id = os.urandom(1023), os.urandom(1024)
    before = stored_bytes(app)
    response = enrol(logged_in, too_long)
    assert flashed(logged_in, response) == [("error", passkeys.REFUSED)]
    assert audit_lines.of("passkey_add_refused", "reason") == [("alice", "credential id too long")]
    assert stored_bytes(app) == before
    assert flashed(logged_in, enrol(logged_in, longest))[0][0] == "success"
    assert record(app)["passkeys"][0]["id"] == b64(longest.credential_id)


@pytest.mark.parametrize(
    "transports, kept",
    [
        (["usb", "internal", "carrier-pigeon", "usb"], ["internal", "usb"]),
        ("internal", []),
        (["internal", 5], []),
        (None, []),
    ],
)
def test_a_passkeys_transports_are_kept_when_known_and_offered_back(
    app, logged_in, transports, kept
):
    options, action, token = ceremony(
        begin(logged_in, "/security/passkeys/add", "/security", name="x")
    )
    credential = SoftAuthenticator().create(options, origin_of(app))
    credential["response"]["transports"] = transports
    assert flashed(logged_in, finish(logged_in, action, token, credential))[0][0] == "success"
    assert record(app)["passkeys"][0]["transports"] == kept
    # The browser is told where to look for the passkey: the second step lists them.
    log_out(logged_in)
    AuthActions(logged_in).login()
    options, _, _ = ceremony(begin(logged_in, "/login/two-factor/passkey", "/login/two-factor"))
    [allowed] = options["allowCredentials"]
    assert allowed.get("transports", []) == kept and allowed["id"] == credential["id"]


def test_two_browsers_adding_a_first_passkey_at_once_keep_one_user_handle(
    app, logged_in, audit_lines
):
    # Each drew its own handle (there was none yet): the second would orphan the first's.
    other = app.test_client()
    assert AuthActions(other).login().status_code == 302
    first = ceremony(begin(logged_in, "/security/passkeys/add", "/security", name="One"))
    second = ceremony(begin(other, "/security/passkeys/add", "/security", name="Two"))
    one, two = SoftAuthenticator(), SoftAuthenticator()
    options, action, token = first
    assert flashed(logged_in, finish(logged_in, action, token, one.create(options, origin_of(app))))
    before = stored_bytes(app)
    options, action, token = second
    response = finish(other, action, token, two.create(options, origin_of(app)))
    assert flashed(other, response) == [
        ("error", "That passkey could not be added. Please look again.")
    ]
    assert audit_lines.of("passkey_add_refused", "reason") == [
        ("alice", "changed meanwhile or a duplicate")
    ]
    assert stored_bytes(app) == before and record(app)["webauthn_user"] == one.user_handle


def test_the_same_authenticator_cannot_be_added_twice(app, logged_in, alice_key):
    # A browser's excludeCredentials prevents it; the server does not rely on that.
    before = stored_bytes(app)
    response = enrol(logged_in, alice_key, "Again")
    assert flashed(logged_in, response) == [
        ("error", "That passkey could not be added. Please look again.")
    ]
    assert stored_bytes(app) == before


def test_an_answered_registration_cannot_be_replayed_with_the_cookie_from_before(app, logged_in):
    options, action, token = ceremony(
        begin(logged_in, "/security/passkeys/add", "/security", name="x")
    )
    cookie_name = app.config["SESSION_COOKIE_NAME"]
    saved = logged_in.get_cookie(cookie_name).value
    assert enrol_answer(logged_in, action, token, options) == "success"
    before = stored_bytes(app)
    logged_in.set_cookie(cookie_name, saved)  # the challenge again, for another authenticator
    assert enrol_answer(logged_in, action, token, options) == "error"
    assert stored_bytes(app) == before and len(record(app)["passkeys"]) == 1


def enrol_answer(client, action: str, token: str, options: dict) -> str:
    """Answer a registration with a new authenticator; the category of what the site says."""
    credential = SoftAuthenticator().create(options, origin_of(client.application))
    [(category, _)] = flashed(client, finish(client, action, token, credential))
    return category


def test_an_account_holds_at_most_ten_passkeys(app, logged_in, alice_key):
    for n in range(2, passkeys.MAX_PASSKEYS):
        enrol(logged_in, SoftAuthenticator(), f"Key {n}")
    assert len(record(app)["passkeys"]) == 9
    options, action, token = ceremony(
        begin(logged_in, "/security/passkeys/add", "/security", name="Tenth")
    )
    with app.app_context():  # meanwhile a tenth is added from another device
        get_store().update(
            "alice",
            lambda r: r["passkeys"].append({**r["passkeys"][0], "id": b64(os.urandom(32))}),
        )
    before = stored_bytes(app)
    assert enrol_answer(logged_in, action, token, options) == "error"
    response = begin(logged_in, "/security/passkeys/add", "/security", name="Eleventh")
    assert flashed(logged_in, response) == [
        ("error", "You have 10 passkeys already. Remove one first.")
    ]
    assert stored_bytes(app) == before


@pytest.mark.parametrize("name", ["", "   ", "x" * 65, "zero\u200bwidth", None])
def test_a_passkey_name_must_be_1_to_64_printable_characters(app, logged_in, alice_key, name):
    key_id = b64(alice_key.credential_id)
    token = csrf_token(logged_in, "/security")
    fields = {} if name is None else {"name": name}
    before = stored_bytes(app)
    for url, data in [
        ("/security/passkeys/add", fields),
        ("/security/passkeys/rename", {"passkey": key_id, **fields}),
    ]:
        response = logged_in.post(url, data={"csrf_token": token, **data})
        assert flashed(logged_in, response) == [
            ("error", "Give the passkey a name of 1 to 64 characters.")
        ]
    assert stored_bytes(app) == before


def test_a_name_of_64_characters_is_taken(app, logged_in, alice_key):
    token = csrf_token(logged_in, "/security")
    key_id = b64(alice_key.credential_id)
    name = "\u00e9" * 64
    response = logged_in.post(
        "/security/passkeys/rename", data={"csrf_token": token, "passkey": key_id, "name": name}
    )
    assert flashed(logged_in, response) == [("success", "Passkey renamed.")]
    assert record(app)["passkeys"][0]["name"] == name


def test_renaming_is_confirmed_audited_and_recorded_under_the_old_name(
    app, logged_in, alice_key, audit_lines
):
    token = csrf_token(logged_in, "/security")
    response = logged_in.post(
        "/security/passkeys/rename",
        data={"csrf_token": token, "passkey": b64(alice_key.credential_id), "name": "Phone"},
    )
    assert flashed(logged_in, response) == [("success", "Passkey renamed.")]
    assert audit_lines.of("passkey_renamed") == [("alice",)]
    assert record(app)["events"][-1]["k"] == "passkey_renamed"
    assert record(app)["events"][-1]["name"] == "Laptop"


def test_removing_a_passkey_is_confirmed_audited_and_mailed(app, logged_in, alice_key, audit_lines):
    address = verified_address(app)
    token = csrf_token(logged_in, "/security")
    response = logged_in.post(
        "/security/passkeys/remove",
        data={"csrf_token": token, "passkey": b64(alice_key.credential_id)},
    )
    assert flashed(logged_in, response) == [
        ("success", "Passkey \u201cLaptop\u201d removed. It no longer signs in.")
    ]
    assert audit_lines.of("passkey_removed") == [("alice",)]
    assert notices_to(app, address) == ["Security notice: a passkey was removed from your account"]


def test_an_unknown_passkey_is_neither_renamed_nor_removed_nor_audited(
    app, logged_in, alice_key, audit_lines
):
    address = verified_address(app)
    token = csrf_token(logged_in, "/security")
    before = stored_bytes(app)
    for url, fields in [
        ("/security/passkeys/rename", {"passkey": "AAAA", "name": "x"}),
        ("/security/passkeys/remove", {"passkey": "AAAA"}),
        ("/security/passkeys/remove", {}),
    ]:
        response = logged_in.post(url, data={"csrf_token": token, **fields})
        assert flashed(logged_in, response) == [
            ("error", "That passkey is not on this account any more.")
        ]
    assert stored_bytes(app) == before
    assert audit_lines.of("passkey_renamed") == audit_lines.of("passkey_removed") == []
    assert notices_to(app, address) == []


# -- signing in with a passkey alone: what is said and audited ----------------------------------


def test_a_passkey_sign_in_is_audited_and_recorded_as_one(app, logged_in, alice_key, audit_lines):
    log_out(logged_in)
    assert passkey_login(logged_in, alice_key).headers["Location"] == "/account-details"
    assert audit_lines.of("login_success", "method") == [("alice", "passkey")]
    last = record(app)["events"][-1]
    assert (last["k"], last["method"]) == ("login_success", "passkey")


def test_a_refused_passkey_sign_in_says_why_and_is_audited(app, logged_in, alice_key, audit_lines):
    log_out(logged_in)
    options, action, token = ceremony(begin(logged_in, "/login/passkey"))
    credential = alice_key.get(options, origin_of(app))
    assert finish(logged_in, action, token, credential).headers["Location"] == "/account-details"
    log_out(logged_in)
    # Answered again: its challenge is gone, and without one the credential is not even read.
    response = finish(logged_in, action, csrf_token(logged_in), credential)
    assert flashed(logged_in, response) == [("error", passkeys.EXPIRED)]
    options, action, token = ceremony(begin(logged_in, "/login/passkey"))
    credential = alice_key.get(options, origin_of(app))
    credential["response"]["signature"] = credential["response"]["signature"][::-1]
    response = finish(logged_in, action, token, credential)
    assert flashed(logged_in, response) == [("error", passkeys.REFUSED)]
    assert audit_lines.of("login_failure", "method") == [(None, "passkey"), ("alice", "passkey")]


def test_a_sign_in_with_an_unsafe_next_goes_to_the_account_page(app, logged_in, alice_key):
    log_out(logged_in)
    options, action, token = ceremony(begin(logged_in, "/login/passkey?next=https://evil.example"))
    credential = alice_key.get(options, origin_of(app))
    assert finish(logged_in, action, token, credential).headers["Location"] == "/account-details"


def test_a_passkey_removed_while_its_sign_in_is_checked_gives_no_session(
    app, logged_in, alice_key, audit_lines, monkeypatch
):
    log_out(logged_in)
    challenges = record(app)["passkey_challenges"]
    real = passkeys.auth.begin_session_without_password

    def removed_meanwhile(username, claim, method):
        get_store().update(username, lambda r: r.update(passkeys=[]))  # another device
        return real(username, claim, method)

    monkeypatch.setattr(passkeys.auth, "begin_session_without_password", removed_meanwhile)
    response = passkey_login(logged_in, alice_key)
    assert flashed(logged_in, response) == [("error", passkeys.REFUSED)]
    assert who(logged_in) is None and record(app)["passkeys"] == []
    assert record(app)["passkey_challenges"] == challenges  # nothing but the removal was written
    assert audit_lines.of("login_failure", "method", "reason") == [
        ("alice", "passkey", "changed meanwhile")
    ]


# -- the second step and re-authentication: what is said and audited -----------------------------


def second_step_ceremony(client) -> tuple[dict, str, str]:
    return ceremony(begin(client, "/login/two-factor/passkey", "/login/two-factor"))


def test_the_second_step_signs_in_fresh_to_next_and_is_audited(
    app, logged_in, alice_key, audit_lines
):
    log_out(logged_in)
    AuthActions(logged_in).login(next="/security")
    options, action, token = second_step_ceremony(logged_in)
    response = finish(logged_in, action, token, alice_key.get(options, origin_of(app)))
    assert response.headers["Location"] == "/security" and who(logged_in) == "alice"
    assert logged_in.get("/security/totp").status_code == 200  # fresh: no re-authentication
    assert audit_lines.of("login_success", "second_factor") == [("alice", "passkey")]
    last = record(app)["events"][-1]
    assert (last["k"], last["method"]) == ("login_success", "passkey")


def test_failed_passkey_second_steps_are_audited_and_count_against_the_user(
    tmp_path, monkeypatch, audit_lines
):
    app = two_factor_app(
        tmp_path, monkeypatch, RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT_USER="3 per minute"
    )
    owner = app.test_client()
    AuthActions(owner).register()
    AuthActions(owner).login()
    key = SoftAuthenticator()
    enrol(owner, key)
    attacker = app.test_client()
    assert AuthActions(attacker).login().headers["Location"] == "/login/two-factor"
    for _ in range(3):
        token = csrf_token(attacker, "/login/two-factor")
        response = finish(attacker, "/login/two-factor/passkey/verify", token, "{}")
        assert flashed(attacker, response) == [("error", passkeys.REFUSED)]
    assert audit_lines.of("two_factor_failure", "method") == 3 * [("alice", "passkey")]
    # The fourth try is refused before the passkey is looked at, even the right one.
    options, action, token = second_step_ceremony(attacker)
    response = finish(attacker, action, token, key.get(options, origin_of(app)))
    assert response.status_code == 429 and who(attacker) is None
    # The password form's bucket: /login for alice is held too.
    assert AuthActions(app.test_client()).login().status_code == 429


def test_a_second_step_after_its_pending_login_expired_starts_over_without_its_challenge(
    clock, app, logged_in, alice_key
):
    log_out(logged_in)
    AuthActions(logged_in).login()
    options, action, token = second_step_ceremony(logged_in)
    clock.advance(two_factor.PENDING_TTL + 1)
    before = stored_bytes(app)
    response = finish(logged_in, action, token, alice_key.get(options, origin_of(app)))
    assert flashed(logged_in, response) == [
        ("info", "Your sign-in took too long. Please log in again.")
    ]
    with logged_in.session_transaction() as s:
        assert passkeys.CEREMONY not in s
    assert who(logged_in) is None and stored_bytes(app) == before


def test_a_second_step_challenge_answers_only_the_password_login_it_was_drawn_for(
    app, logged_in, alice_key
):
    log_out(logged_in)
    AuthActions(logged_in).login()
    options, action, token = second_step_ceremony(logged_in)
    with logged_in.session_transaction() as s:
        s[passkeys.CEREMONY] = {**s[passkeys.CEREMONY], "h": "another password login"}
    before = stored_bytes(app)
    response = finish(logged_in, action, token, alice_key.get(options, origin_of(app)))
    assert response.headers["Location"] == "/login/two-factor"
    assert who(logged_in) is None and stored_bytes(app) == before


def test_a_second_step_that_loses_a_race_with_a_password_change_starts_over(
    app, logged_in, alice_key, monkeypatch
):
    log_out(logged_in)
    AuthActions(logged_in).login()
    options, action, token = second_step_ceremony(logged_in)
    real = mfa.guarded_update

    def then_the_password_changes(*args):
        done = real(*args)
        new = passwords.hash_password(OTHER_PASSWORD)
        get_store().update("alice", lambda r: r.update(password_hash=new))
        return done

    monkeypatch.setattr(mfa, "guarded_update", then_the_password_changes)
    response = finish(logged_in, action, token, alice_key.get(options, origin_of(app)))
    assert flashed(logged_in, response) == [("info", "Please log in again.")]
    assert response.headers["Location"] == "/login" and who(logged_in) is None


def test_the_second_step_offers_a_code_to_an_account_without_a_passkey(app, logged_in):
    with app.app_context():
        fields, _ = mfa.enable_totp("alice", mfa.new_secret(), 0, int(time.time()))
        get_store().update("alice", lambda r: r.update(fields))
    log_out(logged_in)
    AuthActions(logged_in).login()
    response = begin(logged_in, "/login/two-factor/passkey", "/login/two-factor")
    assert response.headers["Location"] == "/login/two-factor"
    assert flashed(logged_in, response) == [
        ("info", "This account has no passkey. Use a code instead.")
    ]


def test_reauthentication_offers_the_password_to_an_account_without_a_passkey(app, logged_in):
    for asked, back in [
        ("/security/totp", "/reauthenticate?next=/security/totp"),
        ("https://evil.example/", "/reauthenticate?next=/security"),  # not ours: the default
    ]:
        response = begin(logged_in, f"/reauthenticate/passkey?next={asked}", "/security")
        assert response.headers["Location"] == back
        assert flashed(logged_in, response) == [
            ("info", "You have no passkey. Use your password instead.")
        ]


def test_a_refused_reauthentication_is_audited_and_keeps_where_it_was_going(
    app, logged_in, alice_key, audit_lines
):
    make_stale(logged_in)
    response = finish(logged_in, "/reauthenticate/passkey/verify", csrf_token(logged_in), "{}")
    assert response.headers["Location"] == "/reauthenticate?next=/security"  # no challenge
    url = "/reauthenticate/passkey?next=/security/totp"
    options, action, token = ceremony(begin(logged_in, url, "/security"))
    credential = alice_key.get(options, origin_of(app))
    credential["response"]["signature"] = credential["response"]["signature"][::-1]
    response = finish(logged_in, action, token, credential)
    assert response.headers["Location"] == "/reauthenticate?next=/security/totp"
    assert flashed(logged_in, response) == [("error", passkeys.REFUSED)]
    assert audit_lines.of("reauth_failure", "method") == 2 * [("alice", "passkey")]
    assert audit_lines.of("reauth_success") == []
    options, action, token = ceremony(begin(logged_in, url, "/security"))
    response = finish(logged_in, action, token, alice_key.get(options, origin_of(app)))
    assert response.headers["Location"] == "/security/totp"
    assert audit_lines.of("reauth_success", "method") == [("alice", "passkey")]


# -- the relying party and the script, from the configuration --------------------------------


@pytest.mark.parametrize(
    "public_url, warned",
    [
        ("http://localhost:8000", None),
        ("http://127.0.0.1:8000", "127.0.0.1"),
        ("http://[::1]:8000", "::1"),
    ],
)
def test_a_public_url_on_an_ip_address_is_warned_about(tmp_path, caplog, public_url, warned):
    # An IP address cannot be an RP ID: every passkey ceremony would fail in the browser.
    with caplog.at_level(logging.WARNING, "secure_app.passkeys"):
        make_app(tmp_path, PUBLIC_URL=public_url)
    found = [r.getMessage() for r in caplog.records if r.name == "secure_app.passkeys"]
    expected = f"PUBLIC_URL's host {warned} is an IP address: passkeys need a host name"
    assert found == ([expected] if warned else [])


def test_the_ceremony_script_is_pinned_and_versioned_by_its_content(app, client):
    page = begin(client, "/login/passkey").get_data(as_text=True)
    digest = hashlib.sha384(Path(app.static_folder, "js", "passkeys.js").read_bytes()).digest()
    src = f"/public/js/passkeys.js?v={digest[:6].hex()}"
    integrity = "sha384-" + base64.b64encode(digest).decode()
    assert f'src="{src}" integrity="{integrity}"' in page


def test_a_user_with_totp_too_can_add_a_passkey(app, logged_in):
    with app.app_context():
        fields, _ = mfa.enable_totp("alice", mfa.new_secret(), 0, int(time.time()))
        get_store().update("alice", lambda r: r.update(fields))
    response = enrol(logged_in, SoftAuthenticator(), "Phone")
    assert flashed(logged_in, response) == [("success", "Passkey \u201cPhone\u201d added.")]
    assert [k["name"] for k in record(app)["passkeys"]] == ["Phone"]


def test_a_challenge_drawn_to_add_a_passkey_does_not_re_authenticate(app, logged_in, alice_key):
    options, _, token = ceremony(begin(logged_in, "/security/passkeys/add", "/security", name="x"))
    make_stale(logged_in)
    # alice's real passkey, signing the registration's challenge (same user, other ceremony).
    asked = {"challenge": options["challenge"], "rpId": options["rp"]["id"]}
    credential = alice_key.get(asked, origin_of(app))
    before = stored_bytes(app)
    response = finish(logged_in, "/reauthenticate/passkey/verify", token, credential)
    assert response.headers["Location"] == "/reauthenticate?next=/security"
    assert logged_in.get("/security/totp").status_code == 303  # still not re-authenticated
    assert stored_bytes(app) == before


def test_a_credential_of_16_kib_is_read_and_a_longer_one_is_not(app, logged_in, alice_key):
    log_out(logged_in)
    for extra, signed_in in [(1, None), (0, "alice")]:
        options, action, token = ceremony(begin(logged_in, "/login/passkey"))
        text = json.dumps(alice_key.get(options, origin_of(app)))
        finish(logged_in, action, token, text.ljust(passkeys.MAX_CREDENTIAL + extra))
        assert who(logged_in) == signed_in


def test_a_second_step_answer_without_a_password_login_starts_over(app, client):
    response = finish(client, "/login/two-factor/passkey/verify", csrf_token(client), "{}")
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert who(client) is None
