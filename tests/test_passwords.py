"""Password rules (length, exactness, guessability) and Argon2id hashing (parameters, upgrades)."""

from __future__ import annotations

import secrets
import string

import pytest
from argon2 import PasswordHasher
from argon2.low_level import Type

from helpers import PASSWORD, AuthActions, csrf_token, make_app
from secure_app import passwords
from secure_app.store import get_store


def _register(client, username: str, password: str):
    token = csrf_token(client, "/register")
    return client.post(
        "/register",
        data={"username": username, "password": password, "confirm": password, "csrf_token": token},
    )


def _stored(app, username: str = "alice"):
    with app.app_context():
        return get_store().get(username)


def _random_password(length: int) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + " "
    return "".join(secrets.choice(alphabet) for _ in range(length))


@pytest.mark.parametrize(
    ("length", "accepted"), [(14, False), (15, True), (128, True), (129, False)]
)
def test_password_length_bounds_are_15_and_128(app, client, length, accepted):
    password = _random_password(length)
    response = _register(client, "alice", password)
    assert response.status_code == (302 if accepted else 422)
    assert (_stored(app) is not None) == accepted
    if not accepted:
        assert "characters" in response.get_data(as_text=True)


def test_random_128_character_passphrase_is_accepted_and_logs_in(app, client, auth):
    """zxcvbn refuses input past 72 characters; the policy must not pass that on to users."""
    words = "".join(secrets.choice(string.ascii_lowercase + " ") for _ in range(128))
    assert len(words) == 128
    assert passwords.policy_problem(words, "alice") is None
    assert _register(client, "alice", words).status_code == 302
    assert auth.login("alice", words).status_code == 302


def test_password_is_not_trimmed(app, client, auth):
    padded = "  " + PASSWORD + "  "
    assert _register(client, "alice", padded).status_code == 302
    assert auth.login("alice", PASSWORD).status_code == 200
    assert auth.login("alice", padded).status_code == 302


def test_password_is_not_truncated(app, client, auth):
    """bcrypt-style truncation at 72 bytes would let the first 72 characters log in."""
    long = _random_password(128)
    assert _register(client, "alice", long).status_code == 302
    assert auth.login("alice", long[:72]).status_code == 200
    assert auth.login("alice", long[:-1] + ("a" if long[-1] != "a" else "b")).status_code == 200
    assert auth.login("alice", long).status_code == 302


def test_password_is_case_sensitive_and_unicode_exact(app, client, auth):
    password = "Zebra ünïcode köala ∑ moonlight"
    assert _register(client, "alice", password).status_code == 302
    assert auth.login("alice", password.lower()).status_code == 200
    assert auth.login("alice", password.replace("ü", "u")).status_code == 200
    assert auth.login("alice", password).status_code == 302


@pytest.mark.parametrize(
    "password",
    [
        "passwordpassword",
        "123456789012345",
        "qwertyuiopasdfghjkl",
        "aaaaaaaaaaaaaaaa",
        "iloveyouiloveyou",
        "Password12345678",
    ],
)
def test_common_passwords_are_refused_with_a_helpful_message(app, client, password):
    response = _register(client, "alice", password)
    assert response.status_code == 422
    assert "too easy to guess" in response.get_data(as_text=True)
    assert _stored(app) is None


def test_password_built_from_the_username_is_refused(app, client):
    # Strong on its own (zxcvbn scores it 4); guessable to anyone who knows the name.
    assert passwords.policy_problem("marmaladeskies2024", "") is None
    response = _register(client, "marmaladeskies", "marmaladeskies2024")
    assert response.status_code == 422
    assert _stored(app, "marmaladeskies") is None


def test_long_guessable_password_is_refused_beyond_zxcvbn_limit(app, client):
    password = "password" * 16  # 128 characters
    assert _register(client, "alice", password).status_code == 422
    assert _stored(app) is None


def test_no_composition_rules(app, client):
    """Only length and guessability count: lower-case words alone are fine."""
    assert _register(client, "alice", "orbit lantern cactus meadow").status_code == 302


def _params(stored_hash: str) -> dict[str, int]:
    assert stored_hash.startswith("$argon2id$v=19$")
    fields = stored_hash.split("$")[3]
    return {k: int(v) for k, v in (part.split("=") for part in fields.split(","))}


def test_hashes_are_argon2id_at_or_above_the_owasp_floor(tmp_path):
    app = make_app(tmp_path, real_argon2=True)
    AuthActions(app.test_client()).register()
    params = _params(_stored(app)["password_hash"])
    assert params["m"] >= 19456 and params["t"] >= 2 and params["p"] >= 1


def test_hash_is_upgraded_at_login_after_a_parameter_change(tmp_path):
    old_app = make_app(tmp_path, real_argon2=True)
    AuthActions(old_app.test_client()).register()
    old_hash = _stored(old_app)["password_hash"]
    assert _params(old_hash)["t"] == 2

    new_app = make_app(tmp_path, real_argon2=True, ARGON2_TIME_COST=3)
    # A failed login does not touch the hash.
    assert AuthActions(new_app.test_client()).login("alice", "wrong " + PASSWORD).status_code == 200
    assert _stored(new_app)["password_hash"] == old_hash
    assert AuthActions(new_app.test_client()).login().status_code == 302
    new_hash = _stored(new_app)["password_hash"]
    assert new_hash != old_hash
    assert _params(new_hash)["t"] == 3
    assert PasswordHasher().verify(new_hash, PASSWORD)
    # And the upgraded hash still works at the next login.
    assert AuthActions(new_app.test_client()).login().status_code == 302
    assert _stored(new_app)["password_hash"] == new_hash


class _CountingHasher:
    """The app's real hasher, with a note of the hash each ``verify`` checked."""

    def __init__(self, real: PasswordHasher) -> None:
        self.real = real
        self.verified: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def verify(self, stored_hash: str, password: str) -> bool:
        self.verified.append(stored_hash)
        return self.real.verify(stored_hash, password)


def test_unknown_user_login_still_verifies_an_argon2id_hash(app, client, auth):
    """The same Argon2 work for "no such user" as for "wrong password": no timing oracle."""
    ext = app.extensions["secure_app.passwords"]
    spy = _CountingHasher(ext["hasher"])
    ext["hasher"] = spy
    assert auth.login("nobody", PASSWORD).status_code == 200
    assert len(spy.verified) == 1
    dummy = spy.verified[0]
    assert _params(dummy) == _params(spy.real.hash("x" * 15))
    auth.register()
    auth.login("alice", "wrong " + PASSWORD)
    assert len(spy.verified) == 2


def test_verify_password_with_no_hash_is_false_for_any_password(app):
    with app.app_context():
        assert passwords.verify_password(None, PASSWORD) is False
        assert passwords.verify_password(None, "") is False
        assert passwords.verify_password("not a hash", PASSWORD) is False


def test_argon2_type_is_id(app):
    with app.app_context():
        assert app.extensions["secure_app.passwords"]["hasher"].type is Type.ID


def test_hashes_use_exactly_the_configured_cost_by_default(tmp_path):
    """m=19 MiB, t=2, p=1 unless configured: not argon2-cffi's own defaults (64 MiB, p=4)."""
    app = make_app(tmp_path, real_argon2=True)
    AuthActions(app.test_client()).register()
    assert _params(_stored(app)["password_hash"]) == {"m": 19 * 1024, "t": 2, "p": 1}


def test_every_argon2_setting_is_taken_from_the_config(tmp_path):
    app = make_app(tmp_path, ARGON2_TIME_COST=3, ARGON2_MEMORY_COST=20 * 1024, ARGON2_PARALLELISM=2)
    AuthActions(app.test_client()).register()
    assert _params(_stored(app)["password_hash"]) == {"m": 20 * 1024, "t": 3, "p": 2}


def test_only_if_unchanged_without_a_change_is_a_plain_check():
    """As Store.delete's check: passes on the verified hash, refuses any other, changes nothing."""
    check = passwords.only_if_unchanged("$argon2id$old")
    record = {"password_hash": "$argon2id$old"}
    assert check(record) is None
    assert record == {"password_hash": "$argon2id$old"}
    with pytest.raises(passwords.PasswordChanged):
        check({"password_hash": "$argon2id$new"})


def test_a_password_zxcvbn_scores_exactly_3_is_accepted():
    """MIN_SCORE is 3, "safely unguessable": the boundary itself passes."""
    from zxcvbn import zxcvbn

    password = "zebra zebra zebra zebra"
    assert zxcvbn(password, user_inputs=passwords.SITE_WORDS)["score"] == passwords.MIN_SCORE
    assert passwords.policy_problem(password, "") is None
    assert passwords.policy_problem(password, "alice") is None


def test_refusals_say_what_to_do():
    assert passwords.policy_problem("x" * 14, "") == (
        "Use at least 15 characters. "
        "Several unrelated words make a strong passphrase that is easy to remember."
    )
    assert passwords.policy_problem("x" * 129, "") == "Use at most 128 characters."
    # zxcvbn's warning when it has one...
    assert passwords.policy_problem("1qaz2wsx3edc4rfv", "") == (
        "This password is too easy to guess. This is a very common password."
    )
    # ...else its suggestions, joined.
    assert passwords.policy_problem("HELLOWORLD12345", "") == (
        "This password is too easy to guess. Add another word or two. Uncommon words are better. "
        "All-uppercase is almost as easy to guess as all-lowercase."
    )
