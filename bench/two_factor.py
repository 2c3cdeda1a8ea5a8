"""Benchmark: what the second step adds to a login (password only against password + TOTP).

Run: ``.venv/bin/python bench/two_factor.py`` (options: ``--logins N``).

Both kinds of login run in the same process, alternating, against one app
with the real Argon2id cost, through the real handlers (Flask's test client,
no HTTP): ``POST /login`` for a user without a factor, and ``POST /login``
then ``POST /login/two-factor`` with the current TOTP code for a user with
one. The second step decrypts the secret, checks the code, writes the used
step and starts the session. A code works once per 30-second step, so the
clock (``time.time``) jumps one step before each TOTP login. Prints p50 and
mean per kind, the second step on its own, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import PASSWORD, AuthActions, csrf_token, make_app  # noqa: E402
from secure_app import mfa  # noqa: E402

SECRET_RE = re.compile(r'<code id="totp-secret">([A-Z2-7 ]+)</code>')
ENROLMENT_RE = re.compile(r'name="enrolment" type="hidden" value="([^"]+)"')


class Clock:
    """Real time, plus whole 30-second steps added by ``skip``."""

    def __init__(self) -> None:
        self.real = time.time
        self.offset = 0.0

    def __call__(self) -> float:
        return self.real() + self.offset

    def skip(self) -> None:
        self.offset += mfa.STEP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=40, help="logins of each kind")
    args = parser.parse_args()

    clock = Clock()
    time.time = clock
    tmp = Path(tempfile.mkdtemp(prefix="bench-two-factor-"))
    os.environ["FLASK_INSTANCE_PATH"] = str(tmp / "instance")
    app = make_app(tmp)  # the real Argon2id parameters; limits off
    setup = app.test_client()
    for name in ("plain", "totp"):
        assert AuthActions(setup).register(name).status_code == 302
    AuthActions(setup).login("totp")
    html = setup.get("/security/totp").get_data(as_text=True)
    secret = SECRET_RE.search(html).group(1).replace(" ", "")
    response = setup.post(
        "/security/totp",
        data={
            "code": mfa.code_at(secret, mfa.step_at(time.time())),
            "enrolment": ENROLMENT_RE.search(html).group(1),
            "csrf_token": csrf_token(setup, "/security"),
        },
    )
    assert response.status_code == 200, "enrolment failed"

    plain, full, second = [], [], []
    for _ in range(args.logins):
        client = app.test_client()
        token = csrf_token(client, "/login")
        form = {"username": "plain", "password": PASSWORD, "csrf_token": token}
        start = time.perf_counter()
        response = client.post("/login", data=form)
        plain.append(time.perf_counter() - start)
        assert response.headers["Location"] == "/account-details"

        clock.skip()
        client = app.test_client()
        token = csrf_token(client, "/login")
        form = {"username": "totp", "password": PASSWORD, "csrf_token": token}
        code = mfa.code_at(secret, mfa.step_at(time.time()))
        start = time.perf_counter()
        response = client.post("/login", data=form)
        first = time.perf_counter() - start
        assert response.headers["Location"] == "/login/two-factor", "login is not wired to 2FA"
        # The pending login is a new session: a new CSRF token (fetched outside the timing).
        token = csrf_token(client, "/login")
        start = time.perf_counter()
        done = client.post("/login/two-factor", data={"code": code, "csrf_token": token})
        step = time.perf_counter() - start
        assert done.headers.get("Location") == "/account-details", done.status_code
        full.append(first + step)
        second.append(step)

    print(f"{args.logins} logins of each kind, alternating, real Argon2id, in-process")
    print(f"{'login':<28} {'p50 ms':>8} {'mean ms':>8}")
    print("-" * 46)
    rows = [
        ("password only", plain),
        ("password + TOTP (both)", full),
        ("  the second step alone", second),
    ]
    for name, samples in rows:
        p50, mean = statistics.median(samples), statistics.fmean(samples)
        print(f"{name:<28} {p50 * 1000:>8.2f} {mean * 1000:>8.2f}")
    ratio = statistics.median(full) / statistics.median(plain)
    print(f"ratio, p50 with TOTP / without: {ratio:.2f}x")


if __name__ == "__main__":
    main()
