"""Races between requests: a password change or a deletion landing in the middle of another request.

Each deterministic test makes the second request land at an exact point of
the first: a hook on the real ``verify_password`` (during the Argon2 check) or
on the real store's ``update`` (between the record's load at the start of the
request and its write) runs the other browser's request to completion, in a
thread, through the real handlers. The ``slow`` test races them over HTTP
against a live gunicorn with two worker processes.
"""

from __future__ import annotations

import io
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from PIL import Image

from helpers import OTHER_PASSWORD, PASSWORD, AuthActions, csrf_token, make_app, photo_names
from secure_app import passwords
from secure_app.auth import LOGIN_FAILED
from secure_app.store import get_store
from secure_app.store.text import TextStore

NEW_PASSWORD = "quartz lantern drifts over seven meadows"


def _record(app, username: str = "alice"):
    with app.app_context():
        return get_store().get(username)


def _login(app, username: str = "alice", password: str = PASSWORD):
    client = app.test_client()
    assert AuthActions(client).login(username, password).status_code == 302
    return client


def _logged_in(client) -> bool:
    response = client.get("/account-details")
    assert response.status_code in (200, 302)
    return response.status_code == 200


def _matches(stored_hash: str, password: str) -> bool:
    try:
        return PasswordHasher().verify(stored_hash, password)
    except VerificationError:
        return False


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (20, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _photos(app) -> set[str]:
    return set(photo_names(app))


def _in_thread(action: Callable[[], object]) -> object:
    """Run ``action`` to completion in another thread (its own request context) and return it."""
    box: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(action())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the other request did not finish"
    if errors:
        raise errors[0]
    return box[0]


def _during_first_verify(monkeypatch, action: Callable[[], object]) -> list[object]:
    """Run ``action`` right after the next password check, before that request writes anything."""
    real = passwords.verify_password
    done: list[object] = []

    def hooked(stored_hash, password):
        result = real(stored_hash, password)
        if not done:
            done.append(None)  # once: the other request checks a password too
            done[0] = _in_thread(action)
        return result

    monkeypatch.setattr(passwords, "verify_password", hooked)
    return done


def _before_first_update(monkeypatch, app, action: Callable[[], object]) -> list[object]:
    """Run ``action`` right before the next write to the store, after the request loaded it."""
    with app.app_context():
        store = get_store()
    real = store.update
    done: list[object] = []

    def hooked(key, change):
        if not done:
            done.append(None)
            done[0] = _in_thread(action)
        return real(key, change)

    monkeypatch.setattr(store, "update", hooked)
    return done


def _post(client, path: str, data: dict, page: str = "/account-details", **kwargs):
    return client.post(path, data={**data, "csrf_token": csrf_token(client, page)}, **kwargs)


def _change_password(client, current: str = PASSWORD, new: str = NEW_PASSWORD):
    return _post(
        client,
        "/change-password",
        {"current_password": current, "new_password": new, "confirm": new},
        page="/change-password",
    )


def _upload(client):
    return _post(
        client,
        "/account-details",
        {
            "full_name": "Alice",
            "email": "",
            "phone": "",
            "bio": "",
            "photo": (io.BytesIO(_png()), "a.png"),
        },
        content_type="multipart/form-data",
    )


# -- finding 2: a login in flight and a password change -------------------------------------


def test_only_if_unchanged_applies_the_change_only_to_the_verified_hash(backend):
    store = backend.open()
    store.create("alice", {"password_hash": "H1", "bio": ""})
    store.update("alice", passwords.only_if_unchanged("H1", lambda r: r.update(bio="kept")))
    store.update("alice", lambda r: r.update(password_hash="H2"))  # changed meanwhile
    before = backend.snapshot()
    with pytest.raises(passwords.PasswordChanged):
        store.update("alice", passwords.only_if_unchanged("H1", lambda r: r.update(bio="late")))
    with pytest.raises(passwords.PasswordChanged):
        store.delete("alice", passwords.only_if_unchanged("H1"))
    assert backend.snapshot() == before
    assert store.get("alice") == {"password_hash": "H2", "bio": "kept"}
    assert store.delete("alice", passwords.only_if_unchanged("H2")) is True


def test_login_in_flight_gets_no_session_after_a_password_change(tmp_path, monkeypatch):
    """The change lands between the attacker's check of the old password and the session write."""
    app = make_app(tmp_path, RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT_USER="1 per minute")
    AuthActions(app.test_client()).register()
    owner = _login(app)
    attacker = app.test_client()
    token = csrf_token(attacker, "/login")
    changed = _during_first_verify(monkeypatch, lambda: _change_password(owner).status_code)

    response = attacker.post(
        "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token}
    )

    assert changed == [302]  # the owner's change went through, mid-login
    assert response.status_code == 200  # the attacker's login failed...
    assert LOGIN_FAILED in response.get_data(as_text=True)
    assert not _logged_in(attacker)
    record = _record(app)
    assert len(record["sessions"]) == 1  # ...only the owner's new session lives
    assert _logged_in(owner)
    assert _matches(record["password_hash"], NEW_PASSWORD)
    # ...and it counted as a failed guess for this username (the limit is 1 failure).
    again = attacker.post(
        "/login",
        data={"username": "alice", "password": NEW_PASSWORD, "csrf_token": csrf_token(attacker)},
    )
    assert again.status_code == 429


def test_login_in_flight_does_not_write_a_rehash_of_the_old_password(tmp_path, monkeypatch):
    """With a rehash pending, the old password's new hash must not overwrite the changed one."""
    old_app = make_app(tmp_path, ARGON2_TIME_COST=1)  # the hashes before a parameter change
    AuthActions(old_app.test_client()).register()
    owner = _login(old_app)
    app = make_app(tmp_path, ARGON2_TIME_COST=2)  # the same data, a higher cost: a rehash is due
    with app.app_context():
        assert passwords.needs_rehash(_record(app)["password_hash"])
    attacker = app.test_client()
    token = csrf_token(attacker, "/login")
    changed = _during_first_verify(monkeypatch, lambda: _change_password(owner).status_code)

    response = attacker.post(
        "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token}
    )

    assert changed == [302]
    assert response.status_code == 200
    assert not _logged_in(attacker)
    stored = _record(app)["password_hash"]
    assert _matches(stored, NEW_PASSWORD)
    assert not _matches(stored, PASSWORD)
    assert AuthActions(app.test_client()).login("alice", PASSWORD).status_code == 200


def test_change_password_is_refused_if_the_password_changed_during_its_check(tmp_path, monkeypatch):
    """Another writer (an operator, a reset) sets a new hash while this change checks the old."""
    app = make_app(tmp_path)
    AuthActions(app.test_client()).register()
    client = _login(app)

    def reset() -> None:
        with app.app_context():
            new_hash = passwords.hash_password(OTHER_PASSWORD)
            get_store().update("alice", lambda r: r.update(password_hash=new_hash))

    _during_first_verify(monkeypatch, reset)
    response = _change_password(client)

    assert response.status_code == 422
    assert "This is not your current password." in response.get_data(as_text=True)
    stored = _record(app)["password_hash"]
    assert _matches(stored, OTHER_PASSWORD) and not _matches(stored, NEW_PASSWORD)


def test_delete_is_refused_if_the_password_changed_during_its_check(tmp_path, monkeypatch):
    app = make_app(tmp_path)
    AuthActions(app.test_client()).register()
    client = _login(app)
    owner = _login(app)
    changed = _during_first_verify(monkeypatch, lambda: _change_password(owner).status_code)

    response = _post(client, "/delete-account", {"password": PASSWORD})

    assert changed == [302]
    assert response.status_code in (302, 303)
    assert _record(app) is not None  # not deleted with a password that is no longer the one
    assert _matches(_record(app)["password_hash"], NEW_PASSWORD)
    assert _logged_in(owner)


def test_delete_is_refused_if_a_login_elsewhere_rehashed_the_password_during_its_check(
    tmp_path, monkeypatch
):
    """The deletion is a compare-and-set on the hash it checked, even when no session ended.

    A login under a raised Argon2 cost stores a new hash of the same password and ends
    no session, so only that compare-and-set notices; asked again, the user can delete.
    """
    old_app = make_app(tmp_path)
    AuthActions(old_app.test_client()).register()
    client = _login(old_app)
    assert _upload(client).status_code == 303
    app = make_app(tmp_path, ARGON2_TIME_COST=2)  # the same data, a higher cost: a rehash is due
    before = _record(app)["password_hash"]

    def login_elsewhere():
        _login(app)
        return _record(app)

    rehashed = _during_first_verify(monkeypatch, login_elsewhere)

    response = _post(client, "/delete-account", {"password": PASSWORD})

    assert rehashed[0]["password_hash"] != before  # the other login stored its new hash
    assert response.status_code == 303
    assert response.headers["Location"] == "/account-details"
    assert _record(app) == rehashed[0]  # not deleted, nothing written
    assert len(_photos(app)) == 1
    assert _logged_in(client)
    assert _post(client, "/delete-account", {"password": PASSWORD}).status_code == 302
    assert _record(app) is None


# -- finding 5: deletion races ------------------------------------------------------------


def test_delete_removes_a_photo_uploaded_from_another_tab_during_its_check(tmp_path, monkeypatch):
    app = make_app(tmp_path)
    AuthActions(app.test_client()).register()
    client = _login(app)
    other_tab = _login(app)
    uploaded = _during_first_verify(monkeypatch, lambda: _upload(other_tab).status_code)

    response = _post(client, "/delete-account", {"password": PASSWORD})

    assert uploaded == [303]
    assert response.status_code == 302
    assert _record(app) is None
    assert _photos(app) == set()  # the photo uploaded meanwhile went with the account


def _delete_from_elsewhere(app) -> Callable[[], int]:
    """Alice's other browser, ready to delete the account when called."""
    elsewhere = _login(app)
    token = csrf_token(elsewhere, "/account-details")
    return lambda: (
        elsewhere.post(
            "/delete-account", data={"password": PASSWORD, "csrf_token": token}
        ).status_code
    )


VANISHING = {
    "logout": ("/logout", {}, {}),
    "logout-others": ("/logout-others", {}, {}),
    "change-password": (
        "/change-password",
        {"current_password": PASSWORD, "new_password": NEW_PASSWORD, "confirm": NEW_PASSWORD},
        {},
    ),
    "details": (
        "/account-details",
        {"full_name": "Alice", "email": "", "phone": "", "bio": "x"},
        {},
    ),
    "details-with-photo": (
        "/account-details",
        {"full_name": "Alice", "email": "", "phone": "", "bio": "", "photo": "png"},
        {"content_type": "multipart/form-data"},
    ),
    "remove-photo": ("/account-details/remove-photo", {}, {}),
}


def _form(data: dict) -> dict:
    return {k: (io.BytesIO(_png()), "a.png") if v == "png" else v for k, v in data.items()}


@pytest.mark.parametrize("name", VANISHING)
def test_a_write_to_an_account_deleted_meanwhile_logs_out_without_a_500(
    tmp_path, monkeypatch, name
):
    path, data, kwargs = VANISHING[name]
    app = make_app(tmp_path)
    AuthActions(app.test_client()).register()
    client = _login(app)
    assert _upload(client).status_code == 303
    delete = _delete_from_elsewhere(app)
    token = csrf_token(client, "/account-details")
    deleted = _before_first_update(monkeypatch, app, delete)

    response = client.post(path, data={**_form(data), "csrf_token": token}, **kwargs)

    assert deleted == [302]
    assert response.status_code == 303  # the logged-out path, never a 500
    assert response.headers["Location"] == "/login"
    with client.session_transaction() as cookie:
        assert "uid" not in cookie and "sid" not in cookie
    assert _record(app) is None  # nothing brought back to life
    assert _photos(app) == set()  # no photo left behind, public, without an owner


def test_a_login_to_an_account_deleted_meanwhile_fails_without_a_500(tmp_path, monkeypatch):
    app = make_app(tmp_path)
    AuthActions(app.test_client()).register()
    delete = _delete_from_elsewhere(app)
    attacker = app.test_client()
    token = csrf_token(attacker, "/login")
    deleted = _before_first_update(monkeypatch, app, delete)

    response = attacker.post(
        "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token}
    )

    assert deleted == [302]
    assert response.status_code == 200
    assert LOGIN_FAILED in response.get_data(as_text=True)
    assert not _logged_in(attacker)
    assert _record(app) is None


def test_a_login_over_the_session_of_an_account_deleted_meanwhile_still_logs_in(
    tmp_path, monkeypatch
):
    """This browser was bob's; bob is deleted elsewhere while it logs in as alice."""
    app = make_app(tmp_path)
    AuthActions(app.test_client()).register()
    bob = AuthActions(app.test_client())
    assert bob.register("bob", OTHER_PASSWORD).status_code == 302
    client = _login(app, "bob", OTHER_PASSWORD)
    elsewhere = _login(app, "bob", OTHER_PASSWORD)
    token = csrf_token(elsewhere, "/account-details")

    def delete_bob() -> int:
        data = {"password": OTHER_PASSWORD, "csrf_token": token}
        return elsewhere.post("/delete-account", data=data).status_code

    login_token = csrf_token(client, "/login")
    deleted = _during_first_verify(monkeypatch, delete_bob)

    response = client.post(
        "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": login_token}
    )

    assert deleted == [302]
    assert _record(app, "bob") is None
    assert response.status_code == 302
    assert response.headers["Location"] == "/account-details"
    assert 'class="username">alice<' in client.get("/account-details").get_data(as_text=True)


@pytest.mark.parametrize("name", VANISHING)
def test_a_write_never_lands_in_an_account_registered_again_under_the_name(
    tmp_path, monkeypatch, name
):
    """Deleted, then registered by someone else: the old session's write must not touch it."""
    path, data, kwargs = VANISHING[name]
    app = make_app(tmp_path)
    AuthActions(app.test_client()).register()
    client = _login(app)
    assert _upload(client).status_code == 303
    delete = _delete_from_elsewhere(app)
    newcomer = app.test_client()
    state: dict[str, object] = {}

    def delete_and_register_again() -> None:
        assert delete() == 302
        assert AuthActions(newcomer).register("alice", OTHER_PASSWORD).status_code == 302
        assert AuthActions(newcomer).login("alice", OTHER_PASSWORD).status_code == 302
        assert _upload(newcomer).status_code == 303
        state["record"] = _record(app)

    token = csrf_token(client, "/account-details")
    _before_first_update(monkeypatch, app, delete_and_register_again)

    response = client.post(path, data={**_form(data), "csrf_token": token}, **kwargs)

    assert response.status_code == 303
    assert response.headers["Location"] == "/login"
    assert _record(app) == state["record"]  # the newcomer's account is untouched
    assert _photos(app) == {state["record"]["photo"]}  # only the newcomer's photo
    assert _logged_in(newcomer)
    assert not _logged_in(client)


# -- the same race over HTTP, against real worker processes ---------------------------------


def _token(http: requests.Session, url: str) -> str:
    page = http.get(url, timeout=30).text
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)


def _http_login(http: requests.Session, base: str, password: str) -> int:
    token = _token(http, base + "/login")
    data = {"username": "alice", "password": password, "csrf_token": token}
    return http.post(base + "/login", data=data, allow_redirects=False, timeout=30).status_code


@pytest.mark.slow
def test_logins_racing_a_password_change_over_http_leave_nothing_of_the_old_password(tmp_path):
    """Two gunicorn workers; each round the owner changes the password while a login races it.

    Before each round the stored hash is made with weaker parameters than the
    server's, so every login that gets through its check also writes a rehash.
    Whatever the order: once the change is answered as done, no session made
    with the old password is live and the stored hash takes only the new one.
    """
    from servers import Gunicorn

    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)
    rounds, changed = 16, 0
    env = {"FLASK_RATELIMIT_ENABLED": "false"}
    with Gunicorn(tmp_path, env=env, workers=2) as server:
        base = server.url
        with requests.Session() as http:
            token = _token(http, base + "/register")
            http.post(
                base + "/register",
                data={
                    "username": "alice",
                    "password": PASSWORD,
                    "confirm": PASSWORD,
                    "csrf_token": token,
                },
                timeout=30,
            )
        store = TextStore(tmp_path / "data")
        rng = random.Random(13)
        for _ in range(rounds):
            owner, attacker = requests.Session(), requests.Session()
            assert _http_login(owner, base, PASSWORD) == 302
            old = weak.hash(PASSWORD)
            store.update("alice", lambda r, old=old: r.update(password_hash=old))
            change_token = _token(owner, base + "/change-password")
            login_token = _token(attacker, base + "/login")

            def change(owner=owner, change_token=change_token) -> int:
                data = {
                    "current_password": PASSWORD,
                    "new_password": NEW_PASSWORD,
                    "confirm": NEW_PASSWORD,
                    "csrf_token": change_token,
                }
                url = base + "/change-password"
                return owner.post(url, data=data, allow_redirects=False, timeout=30).status_code

            def login(attacker=attacker, login_token=login_token) -> int:
                time.sleep(rng.uniform(0.0, 0.12))
                data = {"username": "alice", "password": PASSWORD, "csrf_token": login_token}
                url = base + "/login"
                return attacker.post(url, data=data, allow_redirects=False, timeout=30).status_code

            with ThreadPoolExecutor(2) as pool:
                changing, logging_in = pool.submit(change), pool.submit(login)
                change_status, login_status = changing.result(), logging_in.result()
            record = store.get("alice")
            attacker_live = (
                attacker.get(base + "/account-details", allow_redirects=False).status_code == 200
            )
            if change_status == 302:  # the change was answered as done
                changed += 1
                assert _matches(record["password_hash"], NEW_PASSWORD)
                assert not _matches(record["password_hash"], PASSWORD)
                assert not attacker_live, f"a login with the old password survived ({login_status})"
                assert len(record["sessions"]) == 1  # the owner's, made by the change
            else:
                # Refused: the attacker's rehash of the same password landed first.
                assert change_status == 422
                assert _matches(record["password_hash"], PASSWORD)
            # Put the old password back for the next round.
            reset = weak.hash(PASSWORD)
            store.update("alice", lambda r, h=reset: r.update(password_hash=h, sessions={}))
            owner.close()
            attacker.close()
        store.close()
    assert changed >= rounds // 2, "too few changes went through to test anything"
