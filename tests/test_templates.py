"""Templates: nothing inline for the CSP to forbid, nothing unescaped, every page in the layout.

The CSP already blocks inline script and style; these tests keep the
templates from depending on either (a page that needs ``'unsafe-inline'``
would push someone to loosen the policy), and refuse ``|safe`` and
``autoescape false``, which would turn user text into markup. Two checks: the
template sources as written, and the HTML that every page really renders.
"""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from helpers import csrf_token

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
TEMPLATE_FILES = sorted(p for p in TEMPLATES.rglob("*.html"))
URL_ATTRIBUTES = {"href", "src", "action", "formaction", "xlink:href", "data", "poster"}
SCRIPT_SCHEMES = ("javascript:", "vbscript:", "data:text/html")

JINJA_BLOCK = re.compile(r"\{%.*?%\}|\{#.*?#\}|\{\{.*?\}\}", re.S)
JINJA_CODE = re.compile(r"\{%(.*?)%\}|\{\{(.*?)\}\}", re.S)
# A keyword argument that WTForms or a macro would render as an attribute.
HANDLER_KWARG = re.compile(r"(?<![\w.])(on[a-z]+|style)\s*=(?!=)", re.I)
SAFE_FILTER = re.compile(r"\|\s*safe\b")
AUTOESCAPE_OFF = re.compile(r"\{%-?\s*autoescape\s+false", re.I)


class InlineCodeFinder(HTMLParser):
    """Collect every inline script, style, event handler and script URL in an HTML text.

    The one kind of script allowed is a file with Subresource Integrity: a
    ``<script>`` with ``src`` and ``integrity`` and nothing inside
    (``test_scripts_are_the_passkey_file_pinned_by_its_hash`` checks the values).
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script and data.strip():
            self.problems.append("inline code in a <script> element")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.in_script = True
            named = dict(attrs)
            if "src" not in named or "integrity" not in named:
                self.problems.append("<script> element without src and integrity")
        if tag == "style":
            self.problems.append("<style> element")
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"{name}= event handler on <{tag}>")
            if name == "style":
                self.problems.append(f"style= attribute on <{tag}>")
            url = re.sub(r"[\s\x00-\x1f]", "", value or "").lower()
            if name in URL_ATTRIBUTES and url.startswith(SCRIPT_SCHEMES):
                self.problems.append(f"{name}={value!r} script URL on <{tag}>")

    handle_startendtag = handle_starttag


def html_problems(html: str) -> list[str]:
    finder = InlineCodeFinder()
    finder.feed(html)
    finder.close()
    return finder.problems


def source_problems(source: str) -> list[str]:
    """Problems in a template as written: its HTML with Jinja taken out, and its Jinja code."""
    problems = html_problems(JINJA_BLOCK.sub("", source))
    for match in JINJA_CODE.finditer(source):
        code = match.group(1) or match.group(2) or ""
        problems += [
            f"{m.group(1)}= passed to a field or macro" for m in HANDLER_KWARG.finditer(code)
        ]
    if SAFE_FILTER.search(source):
        problems.append("|safe filter")
    if AUTOESCAPE_OFF.search(source):
        problems.append("autoescape false")
    if re.search(r"javascript:", source, re.I):
        problems.append("javascript: URL")
    return problems


# -- the checker itself catches each thing it is meant to catch ------------------------

BAD_SNIPPETS = [
    "<script>alert(1)</script>",
    '<SCRIPT src="/public/x.js"></SCRIPT>',
    '<script src="/public/js/passkeys.js" integrity="sha384-x">alert(1)</script>',
    '<script integrity="sha384-x">alert(1)</script>',
    "<style>body { color: red }</style>",
    '<p style="color: red">x</p>',
    '<button onclick="steal()">x</button>',
    '<img src="/x.png" ONERROR="steal()">',
    '<body onload="steal()">',
    '<a href="javascript:steal()">x</a>',
    '<a href=" JaVaScRiPt:steal()">x</a>',
    '<form action="javascript:steal()"></form>',
    "<p>{{ user.bio|safe }}</p>",
    "<p>{{ user.bio | safe }}</p>",
    "{% autoescape false %}{{ user.bio }}{% endautoescape %}",
    '{{ form.username(onfocus="steal()") }}',
    '{{ field(form.bio, style="display:none") }}',
    '<a href="{{ url }}" onmouseover="{{ x }}">x</a>',
]


@pytest.mark.parametrize("snippet", BAD_SNIPPETS)
def test_checker_catches_each_kind_of_inline_code(snippet):
    assert source_problems(snippet), snippet


def test_checker_passes_ordinary_markup():
    ok = (
        '<a class="button" href="{{ url_for(\'pages.index\') }}">Home</a>'
        "{% if one == 1 %}<p>{{ message }}</p>{% endif %}"
        '{{ field(form.password, autocomplete="current-password", required=True) }}'
        '<img src="/public/images/profile/x.webp" alt="Profile photo">'
        "<script src=\"{{ url_for('static', filename='js/passkeys.js') }}\" "
        'integrity="{{ passkeys_js_integrity }}" crossorigin="anonymous" defer></script>'
    )
    assert source_problems(ok) == []


# -- the templates as written ----------------------------------------------------------


def test_there_are_templates_to_check():
    names = {p.relative_to(TEMPLATES).as_posix() for p in TEMPLATE_FILES}
    assert {"_base.html", "index.html", "second.html", "errors/_error.html"} <= names


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.relative_to(TEMPLATES).as_posix())
def test_template_has_no_inline_code_and_no_unescaped_output(path):
    assert source_problems(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "path",
    [p for p in TEMPLATE_FILES if p.name not in ("_base.html", "_forms.html", "_passkeys.html")],
    ids=lambda p: p.relative_to(TEMPLATES).as_posix(),
)
def test_every_page_template_extends_the_layout(path):
    first = re.search(r"\{%-?\s*extends\s+[\"']([^\"']+)[\"']", path.read_text(encoding="utf-8"))
    assert first, f"{path.name} does not extend a layout"
    assert first.group(1) in ("_base.html", "errors/_error.html")


# -- the pages as rendered ----------------------------------------------------------------

HOSTILE_TEXT = '<script>alert(1)</script>" onmouseover="alert(2)" style="x"'


def test_every_rendered_page_has_no_inline_code(client, auth):
    # Every GET page, anonymous and logged in, with hostile text in the fields
    # that are shown back: escaping must keep it text, never markup.
    pages = {}
    for path in ("/", "/second", "/login", "/register", "/no-such-page"):
        pages[f"anonymous {path}"] = client.get(path)
    auth.register()
    auth.login()
    saved = client.post(
        "/account-details",
        data={
            "csrf_token": csrf_token(client, "/account-details"),
            "full_name": HOSTILE_TEXT,
            "bio": HOSTILE_TEXT,
        },
        content_type="multipart/form-data",
    )
    assert saved.status_code == 303
    for path in ("/", "/second", "/account-details", "/change-password", "/no-such-page"):
        pages[f"logged in {path}"] = client.get(path)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages["logged in /account-details"].text
    for name, response in pages.items():
        assert response.mimetype == "text/html", name
        assert html_problems(response.get_data(as_text=True)) == [], name


SCRIPT_TAG = re.compile(r"<script\b[^>]*>", re.I)
ATTRIBUTE = re.compile(r'([a-z-]+)(?:="([^"]*)")?')


def test_scripts_are_the_passkey_file_pinned_by_its_hash(client, auth):
    """Every script is public/js/passkeys.js, with the SHA-384 of the file the site serves."""
    pages = [client.get(path) for path in ("/", "/login")]
    auth.register()
    auth.login()
    pages.append(client.get("/security"))  # /reauthenticate has it only once a passkey exists
    scripts = [tag for page in pages for tag in SCRIPT_TAG.findall(page.get_data(as_text=True))]
    assert len(scripts) == len(pages)  # one on each of these pages
    for tag in scripts:
        attrs = dict(ATTRIBUTE.findall(tag[len("<script") : -1]))
        assert attrs["src"].startswith("/public/js/passkeys.js?v=")
        served = client.get(attrs["src"])
        assert served.status_code == 200 and served.mimetype == "text/javascript"
        digest = base64.b64encode(hashlib.sha384(served.data).digest()).decode()
        assert attrs["integrity"] == "sha384-" + digest
        assert attrs["crossorigin"] == "anonymous" and "defer" in attrs
    assert SCRIPT_TAG.search(client.get("/second").get_data(as_text=True)) is None  # not loaded
