"""Forgot password: does the answer take longer for an address that has an account (ASVS V6.3.8)?

Builds the app in-process (the Flask test client, so no network noise hides a
difference) on a temporary data folder with ``--users`` accounts, one of
which has the verified address ``known@example.org``; then posts
``/forgot-password`` for that address and for ``unknown@example.org`` in a
shuffled order and times each request on the server side of the client.

Two runs: "drained" waits for the mail queue between requests, so it times
the request path alone; "back to back" does not, so the look-up, the token
write and the ``.eml`` write of a known address run on the mail thread while
the next request is served, as they would on a busy site. Prints each run's
medians, their ratio and p90s. A ratio near 1.00 is the goal; this is a
bench, not a test, and prints numbers only.

    .venv/bin/python bench/forgot_password.py [--requests 300] [--users 200]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from helpers import csrf_token, make_app  # noqa: E402
from secure_app import mail  # noqa: E402
from secure_app.store import get_store  # noqa: E402

KNOWN, UNKNOWN = "known@example.org", "unknown@example.org"


def build(folder: Path, users: int):
    app = make_app(folder, ARGON2_MEMORY_COST=64, ARGON2_TIME_COST=1)
    with app.app_context():
        store = get_store()
        for n in range(users):
            address = KNOWN if n == users // 2 else f"user{n}@example.org"
            store.create(
                f"user{n}",
                {"username": f"user{n}", "password_hash": "x", "sessions": {}}
                | {"email": address, "email_verified": address},
            )
    return app


def run(app, requests: int, drain: bool) -> dict[str, list[float]]:
    client = app.test_client()
    token = csrf_token(client, "/forgot-password")
    order = [KNOWN, UNKNOWN] * (requests // 2)
    random.Random(1).shuffle(order)
    times: dict[str, list[float]] = {KNOWN: [], UNKNOWN: []}
    for address in order:
        data = {"email": address, "csrf_token": token}
        start = time.perf_counter()
        response = client.post("/forgot-password", data=data)
        times[address].append(time.perf_counter() - start)
        assert response.status_code == 200
        if drain:
            assert mail.flush(30, app)
    assert mail.flush(60, app)
    return times


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="per run, both addresses")
    parser.add_argument("--users", type=int, default=200, help="accounts in the store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="forgot-bench-") as tmp:
        app = build(Path(tmp), args.users)
        run(app, 20, drain=True)  # warm up: templates, store, the mail thread
        print(f"{args.requests} requests per run, {args.users} accounts, one with {KNOWN}")
        print(f"{'run':<14}{'known ms':>10}{'unknown ms':>12}{'ratio':>8}{'p90 k/u ms':>16}")
        for label, drain in (("drained", True), ("back to back", False)):
            times = run(app, args.requests, drain)
            known = statistics.median(times[KNOWN]) * 1000
            unknown = statistics.median(times[UNKNOWN]) * 1000
            tails = f"{p90(times[KNOWN]) * 1000:.2f}/{p90(times[UNKNOWN]) * 1000:.2f}"
            print(f"{label:<14}{known:>10.3f}{unknown:>12.3f}{known / unknown:>8.3f}{tails:>16}")
        sent = len(list(Path(app.config["MAIL_FILE_PATH"]).glob("*.eml")))
        print(f"messages written: {sent} (one per request for the known address)")


if __name__ == "__main__":
    main()
