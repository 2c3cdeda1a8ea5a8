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


# -- boundaries and the record helpers ---------------------------------------------------------


def test_spaced_secret_is_groups_of_four_that_join_back_to_the_secret() -> None:
    groups = mfa.spaced(SECRET).split(" ")
    assert [len(g) for g in groups] == [4] * 8
    assert "".join(groups) == SECRET


def test_code_input_is_taken_up_to_its_length_limit_and_refused_beyond() -> None:
    totp = "123456".rjust(mfa.MAX_CODE_INPUT)
    assert mfa.normalize_totp(totp) == "123456"
    assert mfa.normalize_totp(" " + totp) is None
    code = mfa.new_recovery_codes()[0]
    padded = code.ljust(mfa.MAX_CODE_INPUT)
    assert mfa.normalize_recovery(padded) == code.replace("-", "")
    assert mfa.normalize_recovery(padded + " ") is None


def test_recovery_code_characters_are_all_drawn_at_random() -> None:
    # 240 characters from 30: a letter that fills a fifth of them is not chance.
    chars = "".join(mfa.new_recovery_codes()).replace("-", "")
    assert len(chars) == 240
    assert max(chars.count(c) for c in set(chars)) < 48


def test_recovery_hash_salt_is_128_bits() -> None:
    salt_hex, _, digest = mfa.hash_recovery("ABCD" * 6).partition("$")
    assert len(bytes.fromhex(salt_hex)) == 16 and len(digest) == 64


def test_a_corrupt_recovery_entry_does_not_hide_the_codes_after_it() -> None:
    plain = mfa.normalize_recovery(mfa.new_recovery_codes()[0])
    stored = mfa.hash_recovery(plain)
    assert mfa.find_recovery(["zz$00", "not hex$", stored], plain) == stored


def test_qr_code_is_black_on_white_with_its_class_and_title() -> None:
    # Scanners need dark modules on a light background; the page's CSS sizes the class.
    svg = str(mfa.qr_svg(mfa.provisioning_uri(SECRET, "alice")))
    assert 'class="totp-qr"' in svg
    assert "<title>QR code for your app</title>" in svg
    assert 'stroke="#000"' in svg and 'fill="#fff"' in svg
    assert svg.count('role="img"') == 1
    # Drawn at a module scale big enough to scan from a screen; no fixed size, so that
    # site.css can shrink it to its card on a narrow phone (test_browser_mobile.py).
    tag = svg[: svg.index(">")]
    assert "width=" not in tag and "height=" not in tag
    width, height = map(int, re.search(r'viewBox="0 0 (\d+) (\d+)"', tag).groups())
    assert width == height and 200 <= width <= 265


def _dark_modules(svg: str) -> set[tuple[int, int]]:
    """The dark modules of segno's SVG path, as (row, column) from the code's top-left corner."""
    (path,) = re.findall(r'<path[^>]*stroke="#000"[^>]*d="([^"]+)"', svg)
    x = y = 0.0
    dark = set()
    for op, a, b in re.findall(r"([Mmh])(-?[\d.]+)(?: (-?[\d.]+))?", path):
        if op == "M":
            x, y = float(a), float(b)
        elif op == "m":
            x, y = x + float(a), y + float(b)
        else:  # a run of dark modules along the row
            dark.update((int(y), int(x) + i) for i in range(int(a)))
            x += float(a)
    top, left = min(r for r, _ in dark), min(c for _, c in dark)
    return {(r - top, c - left) for r, c in dark}


def test_qr_code_carries_error_correction_level_m_or_higher() -> None:
    # Level M restores 15% of the modules: a phone reads the code off a smudged or glaring screen.
    dark = _dark_modules(str(mfa.qr_svg(mfa.provisioning_uri(SECRET, "alice"))))
    # The format information beside the top-left finder (ISO/IEC 18004 7.9), bit 0 first.
    places = [(i, 8) for i in range(6)] + [(7, 8), (8, 8), (8, 7)]
    places += [(8, 14 - i) for i in range(9, 15)]
    bits = sum(((row, col) in dark) << i for i, (row, col) in enumerate(places)) ^ 0x5412
    data, check = bits >> 10, bits & 0x3FF
    remainder = data
    for _ in range(10):
        remainder = (remainder << 1) ^ ((remainder >> 9) * 0x537)
    assert check == remainder  # a valid BCH code word: these are the format modules
    assert "MLHQ"[data >> 3] in "MQH"


@pytest.mark.parametrize(
    ("record", "totp", "factor"),
    [
        (None, False, False),
        ({}, False, False),
        ({"totp": "not a dict"}, False, False),
        ({"totp": {"id": "f1"}}, True, True),
        ({"passkeys": [{"id": "k1"}]}, False, True),
        ({"passkeys": ["junk", 7]}, False, False),
        ({"passkeys": {"id": "k1"}}, False, False),
    ],
)
def test_which_records_have_a_factor(record, totp: bool, factor: bool) -> None:
    assert mfa.has_totp(record) is totp
    assert mfa.has_factor(record) is factor


def test_passkeys_of_keeps_the_well_formed_keys_in_order() -> None:
    keys = [{"id": "a"}, "junk", {"id": "b"}, None]
    assert mfa.passkeys_of({"passkeys": keys}) == [{"id": "a"}, {"id": "b"}]
    assert mfa.passkeys_of({"passkeys": "abc"}) == []
    assert mfa.passkeys_of(None) == [] and mfa.passkeys_of({}) == []


def test_factor_id_and_recovery_left_read_the_record_defensively() -> None:
    assert mfa.factor_id({"totp": {"id": "f1"}}) == "f1"
    for record in (None, {}, {"totp": "f1"}, {"totp": {}}):
        assert mfa.factor_id(record) is None
    assert mfa.recovery_left({"recovery_codes": ["a", "b", "c"]}) == 3
    for record in (None, {}, {"recovery_codes": "abc"}, {"recovery_codes": None}):
        assert mfa.recovery_left(record) == 0


def test_removing_totp_keeps_passkeys_and_removing_factors_drops_all() -> None:
    def full() -> dict:
        return {
            "username": "alice",
            "totp": {"id": "f1"},
            "recovery_codes": ["x"],
            "passkeys": [{"id": "k"}],
            "passkey_challenges": {"c": 1},
        }

    record = full()
    mfa.remove_totp(record)
    assert record == {
        "username": "alice",
        "passkeys": [{"id": "k"}],
        "passkey_challenges": {"c": 1},
    }
    record = full()
    mfa.remove_factors(record)
    assert record == {"username": "alice"}
    mfa.remove_factors(record)  # nothing left to remove is not an error
    assert record == {"username": "alice"}


def test_enabling_totp_stores_the_step_time_and_hashed_codes(ctx) -> None:
    step = mfa.step_at(NOW)
    fields, codes = mfa.enable_totp("alice", SECRET, step, NOW)
    totp = fields["totp"]
    assert set(fields) == {"totp", "recovery_codes"}
    assert set(totp) == {"id", "secret", "last_step", "added"}
    assert re.fullmatch(r"[0-9a-f]{16}", totp["id"])  # 64 random bits
    assert totp["last_step"] == step and totp["added"] == NOW
    assert mfa.decrypt_secret("alice", totp["secret"]) == SECRET
    assert len(codes) == len(fields["recovery_codes"]) == mfa.RECOVERY_COUNT
    for code, stored in zip(codes, fields["recovery_codes"], strict=True):
        assert mfa.find_recovery([stored], mfa.normalize_recovery(code)) == stored
    assert mfa.recovery_hashes(codes) != fields["recovery_codes"]  # a fresh salt each time


def _record(username: str = "alice", last_step: int | None = None) -> dict:
    fields, codes = mfa.enable_totp(username, SECRET, 0, NOW)
    if last_step is None:
        del fields["totp"]["last_step"]
    else:
        fields["totp"]["last_step"] = last_step
    record = new_user(username, "hash")
    record.update(fields)
    record["plain_codes"] = codes
    return record


def test_check_code_matches_the_current_totp_and_refuses_a_used_step(ctx) -> None:
    step = mfa.step_at(NOW)
    code = mfa.code_at(SECRET, step)
    assert mfa.check_code(_record(), code, NOW) == mfa.Match("totp", step=step)
    assert mfa.check_code(_record(last_step=step - 1), code, NOW) == mfa.Match("totp", step=step)
    assert mfa.check_code(_record(last_step=step), code, NOW) is None
    assert mfa.check_code(_record(), mfa.code_at(SECRET, step + 1), NOW) is None
    no_totp = new_user("alice", "hash")
    assert mfa.check_code(no_totp, code, NOW) is None


def test_check_code_matches_a_recovery_code_in_any_form(ctx) -> None:
    record = _record()
    code = record["plain_codes"][3]
    for typed in (code, code.lower(), code.replace("-", " ")):
        match = mfa.check_code(record, typed, NOW)
        assert match == mfa.Match("recovery", stored=record["recovery_codes"][3])
    record["recovery_codes"].pop(3)
    assert mfa.check_code(record, code, NOW) is None
    assert mfa.check_code(new_user("alice", "hash"), code, NOW) is None
    assert mfa.check_code(record, "not a code", NOW) is None


def test_consuming_a_totp_match_moves_last_step_once(ctx) -> None:
    record = _record(last_step=10)
    assert mfa.consume(mfa.Match("totp", step=11))(record) is True
    assert record["totp"]["last_step"] == 11
    assert mfa.consume(mfa.Match("totp", step=11))(record) is False  # raced: already used
    assert mfa.consume(mfa.Match("totp", step=5))(record) is False
    assert record["totp"]["last_step"] == 11
    fresh = _record()  # no last_step yet: any step counts as new
    assert mfa.consume(mfa.Match("totp", step=0))(fresh) is True
    assert fresh["totp"]["last_step"] == 0


def test_consuming_a_recovery_match_removes_that_code_only_once(ctx) -> None:
    record = _record()
    stored = list(record["recovery_codes"])
    assert mfa.consume(mfa.Match("recovery", stored=stored[2]))(record) is True
    assert record["recovery_codes"] == stored[:2] + stored[3:]
    assert mfa.consume(mfa.Match("recovery", stored=stored[2]))(record) is False
    assert record["recovery_codes"] == stored[:2] + stored[3:]
    empty = {"username": "alice"}
    assert mfa.consume(mfa.Match("recovery", stored=stored[0]))(empty) is False
    assert "recovery_codes" not in empty


def test_guarded_update_writes_only_while_password_and_factor_are_unchanged(ctx) -> None:
    record = _record()
    del record["plain_codes"]
    assert get_store().create("alice", record)
    factor = record["totp"]["id"]

    def mark(r: dict) -> None:
        r["bio"] = "written"

    assert mfa.guarded_update("alice", "other hash", factor, mark) is False
    assert mfa.guarded_update("alice", "hash", "other factor", mark) is False
    assert mfa.guarded_update("alice", "hash", factor, lambda r: mark(r) or False) is False
    assert mfa.guarded_update("nobody", "hash", factor, mark) is False
    assert get_store().get("alice")["bio"] == ""
    assert mfa.guarded_update("alice", "hash", factor, mark) is True  # None is not a refusal
    assert get_store().get("alice")["bio"] == "written"
    plain = new_user("bob", "hash")
    assert get_store().create("bob", plain)
    assert mfa.guarded_update("bob", "hash", None, mark) is True  # no factor: None matches


def test_a_stored_secret_that_does_not_decrypt_is_logged_for_the_operator(ctx, caplog) -> None:
    token = mfa.encrypt_secret("alice", SECRET)
    with caplog.at_level("ERROR", logger="secure_app.mfa"):
        assert mfa.decrypt_secret("alice", token[:-4] + "AAAA") is None
    assert [r.getMessage() for r in caplog.records] == [
        f"a stored TOTP secret does not decrypt: is {mfa.KEY_FILE} the right key file?"
    ]
    caplog.clear()
    with caplog.at_level("ERROR", logger="secure_app.mfa"):
        # An expired enrolment form is the user's business, not the operator's.
        expired = mfa.enrol_token("alice", SECRET, NOW)
        assert mfa.open_enrol_token("alice", expired, NOW + mfa.ENROL_TTL + 1) is None
    assert caplog.records == []


def test_the_key_file_is_read_once_per_version(ctx, monkeypatch) -> None:
    calls = []
    real = mfa.load_keys

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mfa, "load_keys", counting)
    token = mfa.encrypt_secret("alice", SECRET)
    for _ in range(3):
        assert mfa.decrypt_secret("alice", token) == SECRET
    assert len(calls) == 0  # read once already, when the app started (mfa.init_app)
    mfa.rotate_key()
    assert mfa.decrypt_secret("alice", token) == SECRET
    for _ in range(3):
        assert mfa.decrypt_secret("alice", token) == SECRET
    assert len(calls) == 1  # the new version, once


def test_the_key_folder_is_created_private(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLASK_INSTANCE_PATH", str(tmp_path / "fresh" / "instance"))
    app = make_app(tmp_path)
    with app.app_context():
        mfa.encrypt_secret("alice", SECRET)
    assert (tmp_path / "fresh" / "instance").stat().st_mode & 0o777 == 0o700


def test_an_account_deleted_during_rotation_does_not_stop_the_others_moving(
    ctx, tmp_path, monkeypatch
) -> None:
    from cryptography.fernet import Fernet

    _store_totp_user("alice")
    _store_totp_user("bob")
    store = get_store()
    real_get, reads = store.get, []

    def read_then_deleted(key: str):
        record = real_get(key)
        reads.append(key)
        if reads.count("alice") == 2:  # the pass under the new key is about to move her
            store.delete("alice")  # alice deletes her account at that moment
        return record

    monkeypatch.setattr(store, "get", read_then_deleted)
    assert mfa.rotate_key() == (1, [])
    current = json.loads((tmp_path / "instance" / mfa.KEY_FILE).read_text())["current"]
    assert Fernet(current).decrypt(real_get("bob")["totp"]["secret"]).decode().endswith(SECRET)
    assert real_get("alice") is None


def test_rotate_key_moves_every_secret_past_users_without_a_factor(ctx) -> None:
    assert get_store().create("aaron", new_user("aaron", "hash"))  # no factor, listed first
    _store_totp_user("alice")
    assert mfa.rotate_key() == (1, [])
