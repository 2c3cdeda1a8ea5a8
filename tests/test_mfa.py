"""mfa.py on its own: RFC 6238 codes, one step only, code normalisation, recovery codes, the key."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from helpers import make_app, stored_bytes
from secure_app import mfa
from secure_app.store import get_store, new_user

SECRET = mfa.new_secret()
NOW = 1_800_000_010  # 10 s into a 30-second step


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLASK_INSTANCE_PATH", str(tmp_path / "instance"))
    return make_app(tmp_path)


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app


# -- TOTP ----------------------------------------------------------------------------


def test_new_secret_is_160_random_bits_in_base32() -> None:
    secrets_seen = {mfa.new_secret() for _ in range(50)}
    assert len(secrets_seen) == 50
    for secret in secrets_seen:
        assert re.fullmatch(r"[A-Z2-7]{32}", secret)
        assert len(base64.b32decode(secret)) == 20


@pytest.mark.parametrize(
    ("unix_time", "expected"),
    # RFC 6238 appendix B, SHA-1 seed "12345678901234567890", last 6 of the 8 digits.
    [(59, "287082"), (1111111109, "081804"), (1234567890, "005924"), (2000000000, "279037")],
)
def test_codes_are_rfc_6238_sha1_six_digits_thirty_seconds(unix_time: int, expected: str) -> None:
    seed = base64.b32encode(b"12345678901234567890").decode()
    assert mfa.code_at(seed, mfa.step_at(unix_time)) == expected


def test_only_the_current_step_is_accepted() -> None:
    step = mfa.step_at(NOW)
    assert mfa.totp_step(SECRET, mfa.code_at(SECRET, step), NOW, -1) == step
    # The previous and the next step's codes are refused: a code lives 30 s (ASVS V6.5.5).
    assert mfa.totp_step(SECRET, mfa.code_at(SECRET, step - 1), NOW, -1) is None
    assert mfa.totp_step(SECRET, mfa.code_at(SECRET, step + 1), NOW, -1) is None
    assert mfa.totp_step(SECRET, "000000", NOW, -1) in (None, step)


def test_a_step_already_used_is_refused_even_with_its_right_code() -> None:
    step = mfa.step_at(NOW)
    code = mfa.code_at(SECRET, step)
    assert mfa.totp_step(SECRET, code, NOW, step) is None
    assert mfa.totp_step(SECRET, code, NOW + 15, step) is None  # same step, later second
    later = NOW + mfa.STEP
    assert mfa.totp_step(SECRET, mfa.code_at(SECRET, step + 1), later, step) == step + 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("123456", "123456"),
        ("123 456", "123456"),
        (" 123456 ", "123456"),
        ("\u0661\u0662\u0663\u0664\u0665\u0666", None),  # Arabic-Indic digits
        ("\uff11\uff12\uff13\uff14\uff15\uff16", None),  # full-width digits
        ("12345", None),
        ("1234567", None),
        ("12345a", None),
        ("123-456", None),
        ("\t123456", None),
        ("123456\n", None),
        ("", None),
        ("1" * 10_000, None),
        (123456, None),
        (None, None),
        (["123456"], None),
    ],
)
def test_totp_normalisation_takes_six_ascii_digits_only(value: object, expected: str) -> None:
    assert mfa.normalize_totp(value) == expected


# -- recovery codes ----------------------------------------------------------------------


def test_recovery_codes_are_ten_typeable_codes_of_at_least_112_bits() -> None:
    codes = mfa.new_recovery_codes()
    assert len(codes) == 10 == len(set(codes))
    assert math.log2(len(mfa.RECOVERY_ALPHABET)) * mfa.RECOVERY_LENGTH >= 112
    assert not set("01ILOU") & set(mfa.RECOVERY_ALPHABET)  # no look-alikes
    for code in codes:
        assert re.fullmatch(r"([2-9A-HJKMNP-TV-Z]{4}-){5}[2-9A-HJKMNP-TV-Z]{4}", code), code


def test_recovery_codes_are_stored_as_salted_hashes_only() -> None:
    code = mfa.new_recovery_codes()[0]
    plain = mfa.normalize_recovery(code)
    first, second = mfa.hash_recovery(plain), mfa.hash_recovery(plain)
    assert first != second  # a salt per code
    for stored in (first, second):
        assert plain not in stored and code not in stored
        assert mfa.find_recovery([stored], plain) == stored
    other = mfa.normalize_recovery(mfa.new_recovery_codes()[0])
    assert mfa.find_recovery([first, second], other) is None
    assert mfa.find_recovery(["not a hash", 7, None, "zz$00"], plain) is None


@pytest.mark.parametrize(
    "variant",
    [
        lambda c: c,
        lambda c: c.lower(),
        lambda c: c.replace("-", ""),
        lambda c: c.replace("-", " "),
        lambda c: c.replace("-", "").lower(),
        lambda c: " " + c.swapcase() + " ",
        lambda c: "-".join(c.replace("-", "")),  # a hyphen between every character
    ],
)
def test_recovery_codes_ignore_case_spaces_and_hyphens(variant) -> None:
    code = mfa.new_recovery_codes()[0]
    assert mfa.normalize_recovery(variant(code)) == code.replace("-", "")


@pytest.mark.parametrize(
    "bad",
    [
        lambda c: c[:-1],
        lambda c: c + "A",
        lambda c: c.replace(c[0], "0", 1),  # not in the alphabet
        lambda c: c.replace(c[0], "O", 1),
        lambda c: c.replace(c[0], "\uff21", 1),  # a full-width A
        lambda c: c.replace(c[0], "\u0131", 1),  # dotless i: upper() is I
        lambda c: c.replace(c[0], "\u00df", 1),  # sharp s: upper() is SS
        lambda c: c.replace("-", "\t"),
        lambda c: c.replace("-", "_"),
        lambda c: c + " " * 60,
    ],
)
def test_recovery_normalisation_refuses_everything_else(bad) -> None:
    code = mfa.new_recovery_codes()[0]
    assert mfa.normalize_recovery(bad(code)) is None


# -- the URI and the QR code ------------------------------------------------------------------


def test_provisioning_uri_names_the_issuer_and_the_account() -> None:
    uri = mfa.provisioning_uri(SECRET, "alice")
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc, unquote(parts.path)) == (
        "otpauth",
        "totp",
        "/secure_app:alice",
    )
    query = parse_qs(parts.query)
    assert query["secret"] == [SECRET] and query["issuer"] == ["secure_app"]
    # SHA-1, 6 digits and 30 s are the defaults, which apps read when the URI says nothing.
    assert not {"algorithm", "digits", "period"} & set(query)


def test_qr_code_is_inline_svg_that_the_csp_allows() -> None:
    svg = str(mfa.qr_svg(mfa.provisioning_uri(SECRET, "alice")))
    assert svg.startswith('<svg role="img" ') and svg.endswith("</svg>")
    assert "<title>" in svg  # its accessible name
    for forbidden in ("style", "data:", "<script", "href", "javascript:", "on"):
        assert forbidden not in svg.replace("transform", "").replace("</svg>", ""), forbidden


# -- secrets at rest ------------------------------------------------------------------------


def test_secret_is_encrypted_and_bound_to_its_user(ctx) -> None:
    token = mfa.encrypt_secret("alice", SECRET)
    assert SECRET not in token and SECRET.lower() not in token
    assert mfa.decrypt_secret("alice", token) == SECRET
    assert mfa.decrypt_secret("bob", token) is None  # copied into another record: useless
    assert mfa.open_enrol_token("alice", token, NOW) is None  # not an enrolment token either
    for junk in (None, "", "x" * 5000, "gAAAA\u00e9", 12, token[:-4] + "AAAA"):
        assert mfa.decrypt_secret("alice", junk) is None


def test_key_file_is_0600_in_the_instance_folder_not_the_data_folder(ctx, tmp_path) -> None:
    mfa.encrypt_secret("alice", SECRET)
    path = tmp_path / "instance" / mfa.KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    data = Path(ctx.config["DATA_DIR"])
    assert data not in path.parents
    assert not any(mfa.KEY_FILE in p.name for p in tmp_path.joinpath("data").rglob("*"))


def test_an_instance_folder_inside_the_data_folder_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLASK_INSTANCE_PATH", str(tmp_path / "data" / "instance"))
    with pytest.raises(RuntimeError, match="must not be inside the data"):
        make_app(tmp_path)  # at start-up, where the key file is made


def test_enrolment_token_expires_and_names_its_user(ctx) -> None:
    token = mfa.enrol_token("alice", SECRET, NOW)
    assert SECRET not in token
    assert mfa.open_enrol_token("alice", token, NOW + mfa.ENROL_TTL) == SECRET
    assert mfa.open_enrol_token("alice", token, NOW + mfa.ENROL_TTL + 1) is None
    assert mfa.open_enrol_token("bob", token, NOW) is None
    assert mfa.decrypt_secret("alice", token) is None  # not a stored secret


def _store_totp_user(username: str = "alice") -> None:
    fields, _ = mfa.enable_totp(username, SECRET, mfa.step_at(NOW), NOW)
    record = new_user(username, "hash")
    record.update(fields)
    assert get_store().create(username, record)


def test_a_stolen_data_file_alone_yields_no_codes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLASK_INSTANCE_PATH", str(tmp_path / "instance"))
    app = make_app(tmp_path)
    with app.app_context():
        _store_totp_user()
    raw = b"".join(stored_bytes(app).values())  # the data file, or the database's rows
    secret_bytes = base64.b32decode(SECRET)
    for form in (SECRET, SECRET.lower(), mfa.spaced(SECRET)):
        assert form.encode() not in raw
    for encoded in (secret_bytes, secret_bytes.hex().encode(), base64.b64encode(secret_bytes)):
        assert encoded not in raw
    # The thief runs the app on the stolen file (or a dump of the database), with a key
    # of their own.
    thief = tmp_path / "thief"
    monkeypatch.setenv("FLASK_INSTANCE_PATH", str(thief / "instance"))
    if app.config.get("DATABASE_URL"):
        stolen = make_app(thief, DATABASE_URL=app.config["DATABASE_URL"])
    else:
        shutil.copytree(tmp_path / "data", thief / "data")
        stolen = make_app(thief)
    later = NOW + 60
    with stolen.app_context():
        record = get_store().get("alice")
        code = mfa.code_at(SECRET, mfa.step_at(later))
        assert mfa.check_code(record, code, later) is None
        assert mfa.decrypt_secret("alice", record["totp"]["secret"]) is None
    with app.app_context():  # while the real site, with its key, accepts that code
        assert mfa.check_code(get_store().get("alice"), code, later) is not None


def test_rotate_key_reencrypts_every_secret_and_keeps_the_old_key_as_fallback(
    ctx, tmp_path
) -> None:
    _store_totp_user("alice")
    _store_totp_user("bob")
    path = tmp_path / "instance" / mfa.KEY_FILE
    before = json.loads(path.read_text())
    token_before = get_store().get("alice")["totp"]["secret"]
    assert mfa.rotate_key() == (2, [])
    after = json.loads(path.read_text())
    assert after["fallbacks"] == [before["current"]] and after["current"] != before["current"]
    assert path.stat().st_mode & 0o777 == 0o600
    token_after = get_store().get("alice")["totp"]["secret"]
    assert token_after != token_before
    assert mfa.decrypt_secret("alice", token_after) == SECRET
    # Re-encrypted under the new key: the new key alone opens it.
    from cryptography.fernet import Fernet

    assert Fernet(after["current"]).decrypt(token_after).decode().endswith(SECRET)
    # Twice more: the old keys fall away, and nobody is locked out.
    mfa.rotate_key()
    mfa.rotate_key()
    for name in ("alice", "bob"):
        assert mfa.decrypt_secret(name, get_store().get(name)["totp"]["secret"]) == SECRET
    assert before["current"] not in path.read_text()


def test_a_process_notices_a_rotated_key_file_at_its_next_use(ctx, tmp_path) -> None:
    _store_totp_user()
    other = make_app(tmp_path)  # another worker on the same folders, keys already loaded
    with other.app_context():
        assert mfa.decrypt_secret("alice", get_store().get("alice")["totp"]["secret"]) == SECRET
    mfa.rotate_key()
    with other.app_context():
        token = get_store().get("alice")["totp"]["secret"]
        assert mfa.decrypt_secret("alice", token) == SECRET


def test_rotate_key_reports_a_secret_that_no_key_opens(ctx) -> None:
    _store_totp_user()

    def break_it(record):
        record["totp"]["secret"] = "gAAAAAB" + "A" * 100

    get_store().update("alice", break_it)
    assert mfa.rotate_key() == (0, ["alice"])


def test_a_malformed_key_file_is_refused_not_replaced(ctx, tmp_path) -> None:
    folder = tmp_path / "instance"
    os.makedirs(folder, exist_ok=True)
    (folder / mfa.KEY_FILE).write_text('{"current": "not a fernet key", "fallbacks": []}')
    with pytest.raises(RuntimeError, match="not a Fernet key"):
        mfa.encrypt_secret("alice", SECRET)
