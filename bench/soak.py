"""Load soak: 64 clients for 60 seconds against the default serving configuration.

Each client is one registered user with its own keep-alive connections. It
loops over a mix of public pages (anonymous ``/`` and ``/second``), its
authenticated ``/account-details`` and saves of its details (one save in ten
with a small photo), until the time is up. Afterwards every user's last
acknowledged save must be what the server shows and what the data file holds.

Promises, each checked, and the exit status is 1 when one fails:

* no 5xx, no connection error, no unexpected status (a lost session, a refused token);
* no lost save: after each acknowledged save the account page shows it, and at
  the end each user's last acknowledged save is on the page and in ``users.jsonl``;
* the worker's memory (RSS) at the end is within 10% of its level after warm-up.

Loopback only; bounded by the clock (warm-up + duration, each request with a
timeout) and by a request count per client. The rate limits are off
(``FLASK_RATELIMIT_ENABLED=false``): every client comes from 127.0.0.1.

    .venv/bin/python bench/soak.py [--clients 64] [--seconds 60] [--warmup 15]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# tests/servers.py (gunicorn and redis-server for benchmarks) lives in the repository.
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import http.client  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from urllib.parse import urlencode  # noqa: E402

from PIL import Image  # noqa: E402

from tests.servers import Gunicorn  # noqa: E402

PASSWORD = "amber walrus counts nine silver kettles"
CSRF_RE = re.compile(r'name="csrf_token"(?: type="hidden")? value="([^"]+)"')
BIO_RE = re.compile(r"<textarea[^>]*>\s*([^<]*)</textarea>")
TIMEOUT = 30  # seconds for one request: a stuck server fails the soak instead of hanging it
MAX_REQUESTS_PER_CLIENT = 200_000
RETRYABLE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class Failure(Exception):
    """A promise broken by one response."""


class Client:
    """One browser: a keep-alive connection and the session cookie."""

    def __init__(self, port: int, stats: Stats) -> None:
        self.port = port
        self.stats = stats
        self.cookie = ""
        self.conn: http.client.HTTPConnection | None = None
        self.sent = 0

    def request(
        self, method: str, path: str, body: bytes = b"", ctype: str = "", op: str = ""
    ) -> tuple[int, dict[str, str], str]:
        if self.sent >= MAX_REQUESTS_PER_CLIENT:
            raise Failure("request budget exhausted")
        headers = {"Cookie": self.cookie} if self.cookie else {}
        if ctype:
            headers["Content-Type"] = ctype
        for attempt in (1, 2):
            reused = self.conn is not None
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
            start = time.perf_counter()
            try:
                self.conn.request(method, path, body=body or None, headers=headers)
                response = self.conn.getresponse()
                text = response.read().decode("utf-8", "replace")
            except RETRYABLE:
                # The server closed an idle keep-alive connection: reconnect once,
                # as a browser does. A fresh connection failing is a failure.
                self.close()
                if reused and attempt == 1:
                    self.stats.add_retry()
                    continue
                raise
            except BaseException:
                self.close()
                raise
            self.sent += 1
            elapsed = time.perf_counter() - start
            set_cookie = response.getheader("Set-Cookie")
            if set_cookie:
                self.cookie = set_cookie.split(";", 1)[0]
                if self.cookie.endswith("="):  # cleared
                    self.cookie = ""
            self.stats.record(op or path, response.status, elapsed)
            return response.status, dict(response.getheaders()), text
        raise AssertionError("unreachable")

    def get(self, path: str, op: str = "") -> tuple[int, str]:
        status, _, text = self.request("GET", path, op=op)
        return status, text

    def post_form(self, path: str, fields: dict[str, str], op: str = "") -> tuple[int, dict]:
        body = urlencode(fields).encode()
        status, headers, _ = self.request(
            "POST", path, body, "application/x-www-form-urlencoded", op
        )
        return status, headers

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Stats:
    """Counts and latencies, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: Counter[int] = Counter()
        self.latency: dict[str, list[float]] = {}
        self.retries = 0
        self.failures: list[str] = []

    def record(self, op: str, status: int, seconds: float) -> None:
        with self.lock:
            self.status[status] += 1
            self.latency.setdefault(op, []).append(seconds)

    def add_retry(self) -> None:
        with self.lock:
            self.retries += 1

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)


def multipart(fields: dict[str, str], photo: bytes) -> tuple[bytes, str]:
    boundary = "soak" + secrets.token_hex(12)
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        )
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="me.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    body = "".join(parts).encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def small_png() -> bytes:
    image = Image.effect_noise((96, 96), 60).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def csrf_of(page: str) -> str:
    match = CSRF_RE.search(page)
    if not match:
        raise Failure("no csrf_token on the page")
    return match.group(1)


def register_and_log_in(port: int, stats: Stats, username: str) -> Client:
    client = Client(port, stats)
    _, page = client.get("/register", op="setup")
    fields = {"username": username, "password": PASSWORD, "confirm": PASSWORD}
    status, _ = client.post_form("/register", {**fields, "csrf_token": csrf_of(page)}, "setup")
    if status != 302:
        raise Failure(f"registering {username} answered {status}")
    _, page = client.get("/login", op="setup")
    fields = {"username": username, "password": PASSWORD, "csrf_token": csrf_of(page)}
    status, _ = client.post_form("/login", fields, "setup")
    if status != 302:
        raise Failure(f"logging in {username} answered {status}")
    return client


class User:
    """One simulated user: a logged-in client, an anonymous one, and its acknowledged saves."""

    def __init__(self, index: int, client: Client, anon: Client, photo: bytes) -> None:
        self.name = f"soak{index:03d}"
        self.client, self.anon, self.photo = client, anon, photo
        self.rng = random.Random(index)
        self.saves = 0
        self.last_saved: str | None = None
        self.token = ""

    def account_page(self, op: str) -> str:
        status, page = self.client.get("/account-details", op=op)
        if status != 200:
            raise Failure(f"{self.name}: GET /account-details answered {status}")
        self.token = csrf_of(page)
        return page

    def save(self) -> None:
        if not self.token:
            self.account_page("account")
        self.saves += 1
        bio = f"soak {self.name} save {self.saves} {secrets.token_hex(4)}"
        fields = {
            "full_name": f"Soak User {self.name}",
            "email": f"{self.name}@example.org",
            "phone": "+1 555 0100",
            "bio": bio,
            "csrf_token": self.token,
        }
        if self.saves % 10 == 0:
            body, ctype = multipart(fields, self.photo)
            status, headers, _ = self.client.request(
                "POST", "/account-details", body, ctype, "save+photo"
            )
        else:
            status, headers = self.client.post_form("/account-details", fields, "save")
        if status != 303 or headers.get("Location") != "/account-details":
            raise Failure(f"{self.name}: save answered {status}")
        self.last_saved = bio  # acknowledged: from now on it must not be lost
        shown = BIO_RE.search(self.account_page("account after save"))
        if not shown or shown.group(1).strip() != bio:
            raise Failure(f"{self.name}: the page after an acknowledged save does not show it")

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.4:
            path = "/" if roll < 0.2 else "/second"
            status, _ = self.anon.get(path)
            if status != 200:
                raise Failure(f"anonymous GET {path} answered {status}")
        elif roll < 0.8:
            self.account_page("account")
        else:
            self.save()


def worker_pid(server: Gunicorn) -> int:
    assert server.proc is not None
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == server.proc.pid:
                return int(entry.name)
    raise RuntimeError("no gunicorn worker found")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stored_records(data_dir: Path) -> dict[str, dict]:
    """The last record per key in the data file, read the way a person would."""
    records: dict[str, dict] = {}
    for line in (data_dir / "users.jsonl").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue  # the space reserved after the last record
        entry = json.loads(line)
        if "v" in entry:
            records[entry["k"]] = entry["v"]
        else:
            records.pop(entry["k"], None)
    return records


def run_users(users: list[User], stats: Stats, until: float) -> None:
    def loop(user: User) -> None:
        try:
            while time.monotonic() < until:
                user.step()
        except Failure as failure:
            stats.fail(str(failure))
        except Exception as exc:  # every error is a broken promise here
            stats.fail(f"{user.name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=loop, args=(u,), daemon=True) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, until - time.monotonic()) + TIMEOUT + 5)
        if t.is_alive():
            stats.fail("a client thread did not finish in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    env = {"FLASK_RATELIMIT_ENABLED": "false"}
    stats = Stats()
    photo = small_png()
    with Gunicorn(tmp, env=env) as server:
        names = [f"soak{i:03d}" for i in range(args.clients)]
        with ThreadPoolExecutor(8) as pool:
            clients = list(pool.map(lambda n: register_and_log_in(server.port, stats, n), names))
        users = [User(i, c, Client(server.port, stats), photo) for i, c in enumerate(clients)]
        pid = worker_pid(server)
        rss_start = rss_mib(pid)

        run_users(users, stats, time.monotonic() + args.warmup)
        rss_warm = rss_mib(pid)
        warm_requests = sum(stats.status.values())
        for ops in stats.latency.values():
            ops.clear()
        cpu_server, cpu_self = cpu_seconds(pid), sum(os.times()[:2])
        start = time.monotonic()
        rss_samples = [rss_warm]
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.wait(5):
                rss_samples.append(rss_mib(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run_users(users, stats, start + args.seconds)
        elapsed = time.monotonic() - start
        sampler_stop.set()
        sampler.join()
        rss_end = rss_mib(pid)
        cpu_server = cpu_seconds(pid) - cpu_server
        cpu_self = sum(os.times()[:2]) - cpu_self
        total = sum(stats.status.values()) - warm_requests

        # Every acknowledged save, now: on the page, and in the file.
        stored = stored_records(tmp / "data")
        lost_page = lost_file = 0
        for user in users:
            if user.last_saved is None:
                continue
            try:
                shown = BIO_RE.search(user.account_page("verify"))
            except Failure:
                shown = None
            if not shown or shown.group(1).strip() != user.last_saved:
                lost_page += 1
            if stored.get(user.name, {}).get("bio") != user.last_saved:
                lost_file += 1
        for c in clients + [u.anon for u in users]:
            c.close()
        log_text = server.output()

    errors_5xx = sum(n for s, n in stats.status.items() if s >= 500)
    tracebacks = log_text.count("Traceback")
    saves = sum(u.saves for u in users)
    growth = (rss_end - rss_warm) / rss_warm
    print(
        f"\nsoak: {args.clients} clients, {args.warmup} s warm-up then {args.seconds} s, "
        f"default configuration (1 worker, gunicorn.conf.py), {os.cpu_count()} CPUs"
    )
    print(
        f"requests in the {elapsed:.0f} s: {total} ({total / elapsed:.0f}/s); "
        f"saves acknowledged in all: {saves}; statuses {dict(sorted(stats.status.items()))}; "
        f"keep-alive reconnects {stats.retries}"
    )
    print(f"\n{'operation':<20} {'count':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for op, values in sorted(stats.latency.items()):
        if values and op not in ("setup", "verify"):
            q = (
                statistics.quantiles(values, n=100, method="inclusive")
                if len(values) > 1
                else [values[0]] * 99
            )
            print(
                f"{op:<20} {len(values):7d} {q[49] * 1000:8.1f} {q[98] * 1000:8.1f} "
                f"{max(values) * 1000:8.1f}"
            )
    print(
        f"\nworker RSS MiB: at start {rss_start:.1f}, after warm-up {rss_warm:.1f}, "
        f"at the end {rss_end:.1f} ({growth:+.1%}); max during {max(rss_samples):.1f}"
    )
    print(
        f"CPU: worker {cpu_server / elapsed:.0%} of a core, "
        f"load generator {cpu_self / elapsed:.0%} of a core"
    )

    checks = [
        ("no 5xx", errors_5xx == 0, f"{errors_5xx} responses 5xx"),
        ("no broken request", not stats.failures, f"{len(stats.failures)} failures"),
        ("no traceback in the server log", tracebacks == 0, f"{tracebacks} tracebacks"),
        ("no lost save (page)", lost_page == 0, f"{lost_page} users' last save not shown"),
        ("no lost save (data file)", lost_file == 0, f"{lost_file} users' last save not stored"),
        ("RSS within 10% of warm-up", abs(growth) <= 0.10, f"{growth:+.1%}"),
        ("saves happened", saves > 0, f"{saves} saves"),
    ]
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    for message in stats.failures[:10]:
        print("  ", message)
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
