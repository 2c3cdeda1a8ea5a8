"""Benchmark: a wrong password for a known username against one for an unknown username (V6.3.8).

Run: ``.venv/bin/python bench/failed_login_timing.py`` (options: ``--logins N``).

A failed login for a known username now writes an event into the user's
record (events.py); an unknown username has no record. The write happens
when the server closes the response, after its last byte went out, so the
response time of the two must be the same. Through the real handlers
(Flask's test client) with the real Argon2id cost, alternating the two
kinds, this prints the response time of each (until the answer is there)
and, apart, the cost of the deferred write (the response's ``close``), which
is what a client would see if the write were on the response path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import AuthActions, csrf_token, make_app  # noqa: E402

WRONG = "a wrong guess at the password"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=300, help="failed logins of each kind")
    args = parser.parse_args()
    app = make_app(Path(tempfile.mkdtemp(prefix="bench-failed-login-")))
    AuthActions(app.test_client()).register()
    client = app.test_client()
    token = csrf_token(client, "/login")
    times: dict[str, list[float]] = {"known": [], "unknown": [], "deferred write": []}
    for i in range(args.logins):
        order = ("known", "unknown") if i % 2 else ("unknown", "known")
        for kind in order:
            name = "alice" if kind == "known" else "nobody"
            data = {"username": name, "password": WRONG, "csrf_token": token}
            start = time.perf_counter()
            response = client.post("/login", data=data)
            times[kind].append(time.perf_counter() - start)
            assert response.status_code == 200
            start = time.perf_counter()
            response.close()  # what the server does after the last byte: the event is written
            if kind == "known":
                times["deferred write"].append(time.perf_counter() - start)
    print(f"{'':16} {'p10 ms':>8} {'p50 ms':>8} {'p90 ms':>8}")
    for kind, values in times.items():
        deciles = statistics.quantiles(values, n=10)
        p50 = statistics.median(values)
        print(f"{kind:16} {deciles[0] * 1e3:8.2f} {p50 * 1e3:8.2f} {deciles[-1] * 1e3:8.2f}")


if __name__ == "__main__":
    main()
