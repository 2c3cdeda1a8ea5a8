"""The account page (issue 2): prefilled details, field rules, and the profile photo end to end."""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image
from test_two_factor import flashes
from test_uploads import PLACES
from werkzeug.http import http_date

import images
from helpers import (
    AuthActions,
    csrf_token,
    file_size_limit,
    photo_bytes,
    photo_names,
    record_lines,
    stored_bytes,
)
from secure_app import uploads
from secure_app.store.text import TextStore

FIELDS = ("full_name", "email", "phone", "bio")
VALID = {
    "full_name": "Alice Liddell",
    "email": "alice@example.org",
    "phone": "+44 (0)20 7946-0000",
    "bio": "Curious.",
}


class FormValues(HTMLParser):
    """Collect the value of every input and the text of every textarea, by field name."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.values: dict[str, str] = {}
        self._textarea: str | None = None
        self.images: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "input" and attrs.get("name"):
            self.values.setdefault(attrs["name"], attrs.get("value") or "")
        elif tag == "textarea":
            self._textarea = attrs["name"]
            self.values[self._textarea] = ""
        elif tag == "img":
            self.images.append(attrs)

    def handle_data(self, data):
        if self._textarea is not None:
            self.values[self._textarea] += data

    def handle_endtag(self, tag):
        if tag == "textarea" and self._textarea is not None:
            text = self.values[self._textarea]
            # HTML drops one newline right after <textarea>; WTForms adds one for that reason.
            for lead in ("\r\n", "\n"):
                if text.startswith(lead):
                    text = text[len(lead) :]
                    break
            self.values[self._textarea] = text
            self._textarea = None


def parse(page: str) -> FormValues:
    parser = FormValues()
    parser.feed(page)
    return parser


def record(app, username: str = "alice") -> dict:
    return app.extensions["secure_app.store"].get(username)


def data_file(app) -> Path:
    return Path(app.config["DATA_DIR"]) / "users.jsonl"


def post_details(client, photo: tuple[bytes, str, str] | None = None, **fields: str):
    data: dict = {"csrf_token": csrf_token(client, "/account-details"), **VALID, **fields}
    if photo is not None:
        body, filename, content_type = photo
        data["photo"] = (io.BytesIO(body), filename, content_type)
    return client.post("/account-details", data=data, content_type="multipart/form-data")


def upload(client, body: bytes, filename: str = "me.png", content_type: str = "image/png"):
    return post_details(client, photo=(body, filename, content_type))


# -- login required -----------------------------------------------------------------------------


def test_anonymous_visitor_is_sent_to_login_with_next(client):
    response = client.get("/account-details")
    assert response.status_code == 302
    location = urlsplit(response.headers["Location"])
    assert location.path == "/login"
    assert parse_qs(location.query) == {"next": ["/account-details"]}


def test_anonymous_post_stores_nothing(app, client, auth):
    auth.register()
    before = stored_bytes(app)
    token = csrf_token(client, "/login")
    response = client.post("/account-details", data={"csrf_token": token, **VALID})
    assert response.status_code == 302
    assert stored_bytes(app) == before


def test_login_returns_to_the_account_page(client, auth):
    auth.register()
    response = auth.login(next="/account-details")
    assert response.headers["Location"] == "/account-details"


# -- details round trip -------------------------------------------------------------------------


def test_form_is_prefilled_from_the_store(app, logged_in):
    app.extensions["secure_app.store"].update("alice", lambda r: r.update(VALID))
    values = parse(logged_in.get("/account-details").get_data(as_text=True)).values
    assert {f: values[f] for f in FIELDS} == VALID


def test_a_record_without_the_profile_fields_shows_them_empty_and_a_save_adds_them(app, logged_in):
    def drop_fields(r: dict) -> None:
        for f in FIELDS:
            del r[f]

    # A record written by hand into the data file, or by an older tool, may lack them.
    app.extensions["secure_app.store"].update("alice", drop_fields)
    values = parse(logged_in.get("/account-details").get_data(as_text=True)).values
    assert {f: values[f] for f in FIELDS} == dict.fromkeys(FIELDS, "")
    assert post_details(logged_in, full_name="Alice", email="", phone="", bio="").status_code == 303
    # The address is set only by an address change, and none was typed.
    saved = {f: record(app).get(f) for f in FIELDS}
    assert saved == {"full_name": "Alice", "email": None, "phone": "", "bio": ""}


AWKWARD = {
    "full_name": 'O\'Brien "Bob" <b>Zoë</b> Ångström 😀 &amp;',
    "email": "o.brien+tag@example.org",
    "phone": "+1 (555) 000-1234",
    "bio": "<script>alert('x')</script>\nline two\r\n\"quoted\" & 'single' 👩‍💻 \u202eRTL\u202c\n",
}


def test_awkward_text_is_stored_exactly_and_rendered_escaped(app, logged_in):
    response = post_details(logged_in, **AWKWARD)
    assert response.status_code == 303
    stored = record(app)
    assert {f: stored[f] for f in FIELDS} == AWKWARD
    page = logged_in.get("/account-details").get_data(as_text=True)
    assert "<script>alert(" not in page
    assert "<b>Zoë</b>" not in page
    assert "&lt;script&gt;" in page
    values = parse(page).values
    assert {f: values[f] for f in FIELDS} == AWKWARD


@pytest.mark.text_database
def test_data_file_is_readable_utf8_text_with_the_details(app, logged_in):
    post_details(logged_in, **AWKWARD)
    text = data_file(app).read_bytes().decode("utf-8")
    assert "Ångström 😀" in text  # readable as is, not \u-escaped
    assert "o.brien+tag@example.org" in text
    last = json.loads(record_lines(data_file(app))[-1])
    assert last["v"]["bio"] == AWKWARD["bio"]


def test_saved_message_is_shown(logged_in):
    response = post_details(logged_in, email="")  # no address: nothing to say about one
    assert response.headers["Location"] == "/account-details"
    assert flashes(logged_in, "/account-details") == [
        ("flash-success", "Your details have been saved.")
    ]


def test_empty_optional_fields_are_accepted(app, logged_in):
    empty = dict.fromkeys(FIELDS, "")
    assert post_details(logged_in, **empty).status_code == 303
    assert {f: record(app)[f] for f in FIELDS} == empty


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("full_name", "x" * 100),
        ("email", "a@" + "b" * 60 + ".example.org"),
        ("phone", "+" + "1" * 31),
        ("phone", "0123456789 +-()"),
        ("bio", "y" * 1000),
        ("bio", "😀" * 1000),  # characters, not bytes
    ],
)
def test_values_at_the_limit_are_accepted(app, logged_in, field, value):
    assert post_details(logged_in, **{field: value}).status_code == 303
    assert record(app)[field] == value


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("full_name", "x" * 101, "Use at most 100 characters."),
        ("full_name", "Alice\nLiddell", "Remove line breaks and invisible control characters."),
        ("full_name", "Alice\x00", "Remove line breaks and invisible control characters."),
        ("full_name", "Alice\u202eevil", "Remove line breaks and invisible control characters."),
        ("email", "not-an-email", "Enter an email address such as name@example.org."),
        ("email", "alice@example.org\nBcc: x@evil.example", "Enter an email address"),
        ("email", "a@" + "b" * 250 + ".org", "Use at most 254 characters."),
        ("phone", "call me", "Use digits, spaces and + - ( ) only."),
        ("phone", "١٢٣٤", "Use digits, spaces and + - ( ) only."),  # Arabic-Indic digits
        ("phone", "1" * 33, "Use at most 32 characters."),
        ("bio", "z" * 1001, "Use at most 1000 characters."),
    ],
)
def test_each_field_rule_refuses_with_a_message_and_stores_nothing(
    app, logged_in, field, value, message
):
    before = stored_bytes(app)
    response = post_details(logged_in, **{field: value})
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)
    assert stored_bytes(app) == before


def test_missing_csrf_token_is_refused_and_stores_nothing(app, logged_in):
    before = stored_bytes(app)
    response = logged_in.post("/account-details", data=VALID)
    assert response.status_code == 400
    assert stored_bytes(app) == before


# -- photo --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "filename", "content_type"),
    [
        (images.png(metadata=True), "holiday.png", "image/png"),
        (images.jpeg(metadata=True), "IMG_0001.JPG", "image/jpeg"),
        (images.webp(), "x.webp", "image/webp"),
        # The name and the declared type are ignored: only the bytes count.
        (images.jpeg(), "photo.exe", "application/octet-stream"),
    ],
    ids=["png", "jpeg", "webp", "jpeg-named-exe"],
)
def test_real_photo_is_stored_under_a_server_made_name_and_shown(
    app, logged_in, body, filename, content_type
):
    response = post_details(logged_in, photo=(body, filename, content_type))
    assert response.status_code == 303
    name = record(app)["photo"]
    assert uploads.NAME_RE.match(name)  # 32 hex characters, made by the server
    assert photo_names(app) == [name]
    stored = photo_bytes(app, name)
    assert images.SECRET not in stored
    assert Image.open(io.BytesIO(stored)).format == "WEBP"

    page = parse(logged_in.get("/account-details").get_data(as_text=True))
    (img,) = [i for i in page.images if "/images/profile/" in (i.get("src") or "")]
    assert img["src"] == f"/public/images/profile/{name}"
    assert img.get("alt")


def test_full_name_in_the_photo_alt_text_is_escaped(app, logged_in):
    name = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
    assert upload(logged_in, images.png()).status_code == 303
    assert post_details(logged_in, full_name=name).status_code == 303
    page = logged_in.get("/account-details").get_data(as_text=True)
    assert "<script>alert(2)" not in page and "<img src=x" not in page
    (img,) = [i for i in parse(page).images if "/images/profile/" in (i.get("src") or "")]
    assert img["alt"] == f"Profile photo of {name}"
    assert not [key for key in img if key.startswith("on")]


def test_photo_is_served_as_webp_with_nosniff_and_a_restrictive_csp(app, logged_in):
    upload(logged_in, images.png())
    name = record(app)["photo"]
    response = logged_in.get(f"/public/images/profile/{name}")
    assert response.status_code == 200
    assert response.mimetype == "image/webp"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp
    assert Image.open(io.BytesIO(response.data)).format == "WEBP"


def test_photo_is_revalidated_by_a_strong_etag_or_its_time_and_kept_by_no_shared_cache(
    app, logged_in
):
    upload(logged_in, images.png())
    name = record(app)["photo"]
    url = f"/public/images/profile/{name}"
    response = logged_in.get(url)
    # The name without its extension: strong (a name's bytes never change), the same on any host.
    assert response.headers["ETag"] == f'"{name.removesuffix(".webp")}"'
    modified = app.extensions["secure_app.photos"].get(name).modified
    assert response.headers["Last-Modified"] == http_date(modified)
    # Every use asks the server first, and no shared cache keeps it: a removed photo is gone.
    directives = {d.strip() for d in response.headers["Cache-Control"].split(",")}
    assert directives == {"no-cache", "private"}
    for condition in (
        {"If-None-Match": response.headers["ETag"]},
        {"If-Modified-Since": response.headers["Last-Modified"]},
    ):
        again = logged_in.get(url, headers=condition)
        assert again.status_code == 304 and again.data == b"", condition
    changed = logged_in.get(url, headers={"If-None-Match": '"' + "0" * 32 + '"'})
    assert changed.status_code == 200 and changed.data == response.data


@pytest.mark.parametrize(
    ("body", "filename"),
    [
        (b"hello, I am text", "photo.png"),
        (images.SVG, "photo.png"),
        (images.HTML, "photo.jpg"),
        (images.polyglot_zip(images.png()), "photo.png"),
        (images.truncated(images.jpeg((200, 100))), "photo.jpg"),
        (images.png_bomb(8_000, 7_000), "bomb.png"),
    ],
    ids=["text", "svg", "html", "png+zip", "truncated-jpeg", "bomb"],
)
def test_non_image_named_png_is_refused_and_nothing_is_stored(app, logged_in, body, filename):
    before = stored_bytes(app)
    response = post_details(logged_in, photo=(body, filename, "image/png"), full_name="Changed")
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert "JPEG, PNG or WebP" in page or "too large" in page
    assert stored_bytes(app) == before  # the valid full_name was not saved either
    assert photo_names(app) == []


def test_photo_over_five_mib_is_refused_with_a_message(app, logged_in):
    big = images.png() + b"\x00" * uploads.MAX_BYTES
    response = upload(logged_in, big)
    assert response.status_code == 422
    assert "larger than 5 MiB" in response.get_data(as_text=True)
    assert photo_names(app) == []


def test_request_over_the_body_limit_is_413(app, logged_in):
    huge = b"\x00" * (app.config["MAX_CONTENT_LENGTH"] + 1)
    assert upload(logged_in, huge).status_code == 413
    assert photo_names(app) == []


def test_new_photo_replaces_the_old_one(app, logged_in):
    upload(logged_in, images.png())
    old = record(app)["photo"]
    upload(logged_in, images.jpeg())
    new = record(app)["photo"]
    assert new != old
    assert photo_names(app) == [new]
    assert logged_in.get(f"/public/images/profile/{old}").status_code == 404


def test_refused_photo_keeps_the_old_one(app, logged_in):
    upload(logged_in, images.png())
    old = record(app)["photo"]
    assert upload(logged_in, images.polyglot_html(images.jpeg())).status_code == 422
    assert record(app)["photo"] == old
    assert photo_names(app) == [old]


def test_saving_details_without_a_photo_keeps_the_photo(app, logged_in):
    upload(logged_in, images.png())
    old = record(app)["photo"]
    assert post_details(logged_in, full_name="New name").status_code == 303
    assert record(app)["photo"] == old and photo_names(app) == [old]


@pytest.mark.text_database  # the fault is the data file's size limit
def test_failed_save_leaves_no_orphan_photo_and_keeps_the_old_one(app, logged_in, monkeypatch):
    upload(logged_in, images.png())
    old = record(app)["photo"]
    # No reserved space left in the data file, so the save has to grow it.
    monkeypatch.setattr(TextStore, "reserve", 0)
    app.extensions["secure_app.store"].compact()
    before = data_file(app).read_bytes()
    new_photo = images.jpeg((8, 8))
    token = csrf_token(logged_in, "/account-details")
    # The new photo (a few hundred bytes) fits; the record line added to the
    # data file does not, so the store refuses after the photo was written.
    with file_size_limit(len(before) + 64):
        response = logged_in.post(
            "/account-details",
            data={"csrf_token": token, **VALID, "photo": (io.BytesIO(new_photo), "a.jpg")},
            content_type="multipart/form-data",
        )
    assert response.status_code == 503
    assert data_file(app).read_bytes() == before
    assert record(app)["photo"] == old
    assert photo_names(app) == [old]


def test_remove_photo_deletes_file_and_record(app, logged_in):
    upload(logged_in, images.png())
    name = record(app)["photo"]
    token = csrf_token(logged_in, "/account-details")
    response = logged_in.post("/account-details/remove-photo", data={"csrf_token": token})
    assert response.status_code == 303
    assert response.headers["Location"] == "/account-details"
    assert record(app)["photo"] is None
    assert photo_names(app) == []
    assert flashes(logged_in, "/account-details") == [
        ("flash-success", "Your photo has been removed.")
    ]
    page = logged_in.get("/account-details").get_data(as_text=True)
    assert "No photo yet" in page and name not in page


def test_remove_photo_without_csrf_token_is_refused(app, logged_in):
    upload(logged_in, images.png())
    name = record(app)["photo"]
    assert logged_in.post("/account-details/remove-photo").status_code == 400
    assert record(app)["photo"] == name and photo_names(app) == [name]


def test_remove_photo_needs_login(app, client, auth):
    auth.register()
    token = csrf_token(client, "/login")
    response = client.post("/account-details/remove-photo", data={"csrf_token": token})
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login")


@pytest.mark.parametrize(
    "name",
    ["../data/users.jsonl", "..%2Fdata%2Fusers.jsonl", "x.html", "0" * 32 + ".WEBP", "0" * 31],
)
def test_photo_route_serves_only_server_made_names(app, logged_in, name):
    (Path(app.config["PHOTO_DIR"])).mkdir(parents=True, exist_ok=True)
    (Path(app.config["PHOTO_DIR"]) / "x.html").write_text("<script>alert(1)</script>")
    assert logged_in.get(f"/public/images/profile/{name}").status_code == 404


# -- what the page says ------------------------------------------------------------------------


def test_the_page_counts_this_users_live_sessions(app, logged_in):
    assert "You have 1 active session." in logged_in.get("/account-details").get_data(as_text=True)
    AuthActions(app.test_client()).login()
    page = logged_in.get("/account-details").get_data(as_text=True)
    assert "You have 2 active sessions." in page


def test_a_busy_upload_asks_to_retry_in_two_seconds_and_stores_nothing(app, logged_in):
    before = stored_bytes(app)
    for _ in range(PLACES):  # every decode place held, as by uploads still decoding
        assert uploads._admitted.acquire(timeout=10)
    try:
        response = upload(logged_in, images.png())
    finally:
        for _ in range(PLACES):
            uploads._admitted.release()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert stored_bytes(app) == before and photo_names(app) == []


def test_a_refused_photo_refuses_the_whole_save_with_422(app, logged_in):
    response = post_details(
        logged_in, photo=(b"not an image", "me.png", "image/png"), full_name="Changed"
    )
    assert response.status_code == 422
    assert record(app).get("full_name", "") != "Changed"
    assert logged_in.get("/account-details").status_code == 200


def test_an_empty_file_part_as_browsers_send_it_saves_the_details_and_keeps_the_photo(
    app, logged_in
):
    upload(logged_in, images.png())
    old = record(app)["photo"]
    response = post_details(logged_in, photo=(b"", "", "application/octet-stream"), bio="New.")
    assert response.status_code == 303
    assert record(app)["bio"] == "New." and record(app)["photo"] == old
    assert photo_names(app) == [old]
