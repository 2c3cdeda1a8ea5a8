"""What the browser tests do again and again: watch a page, sign up, log in, check, photograph."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from axe_playwright_python.sync_playwright import Axe
from PIL import Image, ImageDraw
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, expect

PASSWORD = "amber lantern drifts over seven quiet hills"
SCREENSHOTS = Path(__file__).parent / "screenshots"
AXE = Axe()  # bundles axe.min.js: nothing is fetched from the network
BLOCKING = ("serious", "critical")
DESKTOP = {"width": 1280, "height": 900}

# Runs before any script of the page's own, whatever its CSP says; the report
# goes to Python through a Playwright binding, so it survives navigations.
REPORT_CSP = """
document.addEventListener("securitypolicyviolation", (e) => {
  window.__reportCspViolation({
    page: location.href,
    directive: e.violatedDirective,
    blocked: e.blockedURI,
    source: e.sourceFile,
    line: e.lineNumber,
    sample: e.sample,
  });
});
"""


class Watch:
    """Everything that went wrong in one page, or in every page of one browser context."""

    def __init__(self, context: BrowserContext | Page) -> None:
        self.csp_violations: list[dict[str, Any]] = []
        self.console_errors: list[tuple[str, str]] = []
        self.page_errors: list[str] = []
        context.expose_function("__reportCspViolation", self._csp)
        context.add_init_script(REPORT_CSP)
        context.on("console", self._console)
        if isinstance(context, Page):
            context.on("pageerror", lambda error: self.page_errors.append(str(error)))
        else:
            context.on("weberror", lambda error: self.page_errors.append(str(error.error)))

    def _csp(self, violation: dict[str, Any]) -> None:
        self.csp_violations.append(violation)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append((message.text, message.location.get("url", "")))

    def unexpected_errors(self, *expected_statuses: int) -> list[str]:
        """Console and page errors, except Chromium's note on an error page's own status.

        Only a page may answer with an expected status: a static file that fails
        (``/public/...``) is always an error.
        """
        allowed = tuple(f"status of {code} " for code in expected_statuses)

        def excused(text: str, url: str) -> bool:
            page_status = text.startswith("Failed to load resource") and any(
                a in text for a in allowed
            )
            return page_status and not urlsplit(url).path.startswith("/public/")

        console = [
            f"{text} at {url}" for text, url in self.console_errors if not excused(text, url)
        ]
        return console + self.page_errors


def new_context(browser: Browser, base_url: str, **options: Any) -> BrowserContext:
    """A fresh browser profile (no cookies, no cache) on the server at ``base_url``."""
    options.setdefault("viewport", DESKTOP)
    return browser.new_context(base_url=base_url, **options)


# -- the site's forms -----------------------------------------------------------


def register(page: Page, username: str, password: str = PASSWORD) -> None:
    page.goto("/register")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_label("Repeat the password").fill(password)
    page.get_by_role("button", name="Create account").click()
    expect(page.locator(".flash-success")).to_contain_text("Your account is ready")


def login(page: Page, username: str, password: str = PASSWORD) -> None:
    page.goto("/login")
    page.locator("main").get_by_label("Username").fill(username)
    page.locator("main").get_by_label("Password").fill(password)
    page.locator("main").get_by_role("button", name="Log in").click()
    expect(page.locator(".who")).to_contain_text(f"Logged in as {username}")


def sign_up(page: Page, username: str, password: str = PASSWORD) -> None:
    """Register ``username`` and log in as it, through the real forms."""
    register(page, username, password)
    login(page, username, password)


def drop_csrf_token(page: Page, form: str = "main form") -> None:
    """Remove the form's CSRF token, as a forged cross-site form would lack it."""
    page.locator(f"{form} input[name=csrf_token]").evaluate("input => input.remove()")


def photo_jpeg(size: tuple[int, int] = (800, 600)) -> bytes:
    """A real photo-like JPEG made with Pillow: a gradient sky and a sun."""
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        shade = int(255 * y / height)
        draw.line([(0, y), (width, y)], fill=(40, 90 + shade // 3, 255 - shade // 2))
    draw.ellipse(
        [width // 3, height // 4, width // 3 + height // 3, height // 4 + height // 3],
        fill=(250, 200, 40),
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


# -- checks ---------------------------------------------------------------------


def serious_violations(page: Page) -> list[str]:
    """Run axe-core on the page; return its serious and critical findings, readable."""
    results = AXE.run(page).response
    found = []
    for violation in results["violations"]:
        if violation["impact"] in BLOCKING:
            targets = [" ".join(map(str, node["target"])) for node in violation["nodes"]]
            found.append(f"{violation['id']} ({violation['impact']}): {targets}")
    return found


def sideways_overflow(page: Page) -> dict[str, Any] | None:
    """None if nothing scrolls sideways; else the widths and the elements sticking out.

    Measured against the screen width we asked for: a mobile browser zooms out
    to fit wide content, which makes ``innerWidth`` grow with the overflow.
    """
    return page.evaluate(
        """(screenWidth) => {
          const width = Math.min(window.innerWidth, screenWidth);
          const scrollWidth = document.scrollingElement.scrollWidth;
          if (scrollWidth <= width) return null;
          const wide = [...document.querySelectorAll("body *")]
            .filter((el) => el.getBoundingClientRect().right > width + 0.5)
            .map((el) => el.tagName.toLowerCase() + (el.className ? "." + el.className : ""));
          return {screenWidth, innerWidth: window.innerWidth, scrollWidth, wide: wide.slice(0, 10)};
        }""",
        page.viewport_size["width"],
    )


def focused(page: Page) -> dict[str, Any]:
    """The focused element: what it is, whether it is :focus-visible, and its outline."""
    return page.evaluate(
        """() => {
          const el = document.activeElement;
          const style = getComputedStyle(el);
          return {
            tag: el.tagName.toLowerCase(),
            name: el.getAttribute("name"),
            text: (el.textContent || "").trim().slice(0, 40),
            focusVisible: el.matches(":focus-visible"),
            outlineStyle: style.outlineStyle,
            outlineWidth: parseFloat(style.outlineWidth),
            outlineColor: style.outlineColor,
          };
        }"""
    )


def tab_to(page: Page, selector: str, limit: int = 30) -> int:
    """Press Tab until the element matching ``selector`` has the focus; return the count."""
    for count in range(1, limit + 1):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement.matches(s)", selector):
            return count
    raise AssertionError(f"{limit} presses of Tab never reached {selector}")


def shot(page: Page, name: str) -> Path:
    """Save a full-page screenshot to tests/browser/screenshots/ (git-ignored)."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    return path


def slug(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "home"


def structure_problems(page: Page) -> list[str]:
    """What a screen-reader user would miss: language, landmarks, one h1, labels, tied errors."""
    return page.evaluate(
        """() => {
          const problems = [];
          if (!document.documentElement.lang) problems.push("no lang on <html>");
          if (!document.title.trim()) problems.push("empty <title>");
          for (const [sel, what] of [["header", "banner"], ["nav[aria-label]", "named nav"],
                                     ["main", "main"], ["footer", "contentinfo"]]) {
            if (document.querySelectorAll(sel).length !== 1) problems.push(`not one ${what}`);
          }
          if (document.querySelectorAll("h1").length !== 1) problems.push("not one h1");
          for (const el of document.querySelectorAll("input, textarea, select")) {
            if (el.type === "hidden") continue;
            const label = [...el.labels].map((l) => l.textContent.trim()).join(" ");
            if (!label) problems.push(`no label for ${el.name}`);
          }
          for (const error of document.querySelectorAll(".error")) {
            const field = document.querySelector(`[aria-describedby~="${error.id}"]`);
            if (!error.id || !field) problems.push(`error not tied: ${error.textContent}`);
            else if (field.getAttribute("aria-invalid") !== "true")
              problems.push(`field ${field.name} has an error but no aria-invalid`);
          }
          return problems;
        }"""
    )
