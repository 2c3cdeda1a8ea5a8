"""What the security costs over HTTP: secure_app against a bare Flask app, under wrk.

One run prints one table. The contenders are served by gunicorn with the real
``gunicorn.conf.py`` and measured in alternating rounds (the order reversed
every other round, so a drift of the machine hits them all alike); each figure
is the median over the rounds:

* bare ``/second`` against secure_app's ``/second`` (anonymous);
* bare account page (a fixed record) against secure_app's authenticated
  ``/account-details`` (logged in once through the real form);
* both in the default configuration (one worker, threads) and with several
  workers sharing a Redis rate-limit storage;
* secure_app's authenticated account page on the text database against the
  same page with ``FLASK_DATABASE_URL`` on a throwaway PostgreSQL (one worker
  each, same run; needs Debian's ``postgresql``, left out without it);
* one ``POST /login`` against one bare Argon2id verify at the configured cost:
  the server's own time for the request (gunicorn's access log, ``%(D)s``),
  which is what the login costs the site, against the verify; and, for
  completeness, what a client waits (its own time and the loopback's
  included), against the bare app's ``POST /login`` doing the same verify.

The rate limits are off (``FLASK_RATELIMIT_ENABLED=false``): the load comes
from one address and would be refused otherwise, and the limiter is on the
login and registration routes only. ``--limits`` turns them on as in
production, with the login and registration limits raised so that the
bench's one client is never refused: the pages then pay for the limiter's
hooks as a deployed site does. Needs ``wrk`` (``apt-get install wrk``)
and, for the several-workers rows, ``redis-server`` (``apt-get install
redis-server``).

    .venv/bin/python bench/http_load.py [--rounds 5] [--seconds 4] [--connections 16]
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
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from urllib.parse import urlencode, urlsplit  # noqa: E402

import requests  # noqa: E402

from bench.bare_app import (  # noqa: E402
    FAKE_CSRF,
    HASHER,
    PASSWORD,
    PASSWORD_HASH,
    PROFILE_FIELDS,
    RECORD,
)
from secure_app.passwords import ARGON2_DEFAULTS  # noqa: E402
from tests.servers import Gunicorn, Postgres, Redis, postgres_bin, redis_server_path  # noqa: E402

USERNAME = RECORD["username"]
CSRF_RE = re.compile(r'name="csrf_token"(?: type="hidden")? value="([^"]+)"')
BENCH_ENV = {"FLASK_RATELIMIT_ENABLED": "false"}
# Access log lines end with the server's own time for the request, in microseconds.
LOG_ARGS = ["--access-logformat", "%(m)s %(U)s %(s)s %(D)s"]
LOGIN_LINE = re.compile(r"^POST /login 302 (\d+)$", re.MULTILINE)
# --limits: the limiter on, its login and registration limits out of the one client's reach.
LIMITS_ENV = {
    "FLASK_RATELIMIT_ENABLED": "true",
    "FLASK_LOGIN_RATE_LIMIT_IP": "100000 per minute",
    "FLASK_LOGIN_RATE_LIMIT_USER": "100000 per minute",
    "FLASK_REGISTER_RATE_LIMIT_IP": "100000 per hour",
}

# wrk keeps each connection's session cookie up to date from Set-Cookie, as a
# browser does; a frozen cookie would make the server re-sign it on every request.
WRK_SCRIPT = """
local cookie = nil
init = function(args)
  if args[1] and #args[1] > 0 then cookie = args[1] end
end
request = function()
  if cookie then wrk.headers["Cookie"] = cookie end
  return wrk.format()
end
response = function(status, headers, body)
  local c = headers["Set-Cookie"]
  if c then cookie = c:match("^[^;]+") end
end
"""


@dataclass
class Run:
    rps: float
    p50: float  # milliseconds
    p99: float
    bad: int  # non-2xx/3xx responses and socket errors
    requests: int
    cpu_us: float = 0.0  # server CPU time (all gunicorn processes) per request


@dataclass
class Contender:
    label: str
    url: str
    cookie: str = ""
    server: Gunicorn | None = None
    runs: list[Run] = field(default_factory=list)

    def measure(self, seconds: int, connections: int, script: Path) -> Run:
        """One wrk run, with the server's CPU time per request."""
        before = server_cpu(self.server) if self.server else 0.0
        run = wrk(self.url, seconds, connections, script, self.cookie)
        if self.server:
            run.cpu_us = (server_cpu(self.server) - before) / max(run.requests, 1) * 1e6
        return run

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


TICK = os.sysconf("SC_CLK_TCK")


def server_cpu(server: Gunicorn) -> float:
    """CPU seconds used so far by a gunicorn master and its workers.

    Unlike requests per second, this hardly moves when other programs share
    the machine, so it shows what a request costs even on a busy host.
    """
    assert server.proc is not None
    master = server.proc.pid
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid, ppid = int(entry.name), int(fields[1])
        if pid == master or ppid == master:
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def wrk(
    url: str, seconds: float, connections: int, script: Path, cookie: str = "", threads: int = 1
) -> Run:
    """Run wrk once and return its throughput, latency percentiles and failures."""
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{round(seconds)}s", "--latency"]
        + ["-s", str(script), url, "--", cookie],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    requests_done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        bad += sum(int(n) for n in errors.groups())
    return Run(rps, p50, p99, bad, requests_done)


def on_postgres(
    stack: ExitStack, tmp: Path, env: dict[str, str], text: Gunicorn, text_cookie: str
) -> tuple[str, Contender, Contender, float]:
    """The account page on the text database against the same page on PostgreSQL."""
    server = stack.enter_context(Postgres())
    pg = stack.enter_context(
        Gunicorn(tmp / "secure-pg", env={**env, "FLASK_DATABASE_URL": server.url()}, args=LOG_ARGS)
    )
    cookie = "session=" + log_in(pg.url).cookies["session"]
    return (
        "account, 1 worker, PostgreSQL",
        Contender("text", text.url + "/account-details", text_cookie, text),
        Contender("pg", pg.url + "/account-details", cookie, pg),
        0.8,
    )


def csrf_of(page: str) -> str:
    match = CSRF_RE.search(page)
    if not match:
        raise SystemExit("no csrf_token on the page: the templates changed, update the bench")
    return match.group(1)


def log_in(base: str) -> requests.Session:
    """Register the bench user, log in through the real form and save the bare app's record."""
    s = requests.Session()
    token = csrf_of(s.get(base + "/register").text)
    form = {"username": USERNAME, "password": PASSWORD, "confirm": PASSWORD, "csrf_token": token}
    s.post(base + "/register", data=form, allow_redirects=False).raise_for_status()
    token = csrf_of(s.get(base + "/login").text)
    form = {"username": USERNAME, "password": PASSWORD, "csrf_token": token}
    r = s.post(base + "/login", data=form, allow_redirects=False)
    if r.status_code != 302:
        raise SystemExit(f"bench login failed with {r.status_code}")
    token = csrf_of(s.get(base + "/account-details").text)
    details = {f: RECORD[f] for f in PROFILE_FIELDS}
    r = s.post(base + "/account-details", data={**details, "csrf_token": token})
    if r.status_code != 200 or "Your details have been saved." not in r.text:
        raise SystemExit(f"bench could not save its record ({r.status_code})")
    # This cookie now holds the CSRF token and no flash message: what a browser sends.
    return s


def same_html(secure: str, bare: str) -> bool:
    """True when the pages differ only in their CSRF token values."""

    def norm(page: str) -> str:
        return CSRF_RE.sub('name="csrf_token" value=""', page).replace(FAKE_CSRF, "")

    return norm(secure) == norm(bare)


class Client:
    """One kept-alive HTTP/1.1 connection and a session cookie: a lean client to time one request.

    python-requests spends about a millisecond of its own on each request,
    which a login's timing would count as the server's; ``http.client``
    spends a small fraction of that.
    """

    def __init__(self, base: str) -> None:
        url = urlsplit(base)
        self.conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port)
        self.cookie = ""

    def request(self, method: str, path: str, form: dict[str, str] | None = None):
        headers = {"Cookie": self.cookie} if self.cookie else {}
        body = None
        if form is not None:
            body = urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        self.conn.request(method, path, body, headers)
        response = self.conn.getresponse()
        text = response.read().decode()
        if cookie := response.getheader("Set-Cookie"):
            self.cookie = cookie.split(";", 1)[0]
        return response.status, text


def _timed_login(client: Client, form: dict[str, str], app: str) -> float:
    """Seconds one POST /login takes; it must succeed (a redirect)."""
    start = time.perf_counter()
    status, _ = client.request("POST", "/login", form)
    elapsed = time.perf_counter() - start
    if status != 302:
        raise SystemExit(f"{app} login in the login-cost row failed with {status}")
    return elapsed


def _secure_login(client: Client) -> float:
    """One POST /login through the real form, as a new visitor (the form's GET untimed)."""
    client.cookie = ""
    _, page = client.request("GET", "/login")
    form = {"username": USERNAME, "password": PASSWORD, "csrf_token": csrf_of(page)}
    return _timed_login(client, form, "secure_app")


def _bare_login(client: Client) -> float:
    """One POST /login on the bare app: one verify and a redirect."""
    return _timed_login(client, {"username": USERNAME, "password": PASSWORD}, "bare app")


def warm_threads(login: Callable[[Client], float], base: str, threads: int) -> None:
    """Let each of the server's threads verify a password once before anything is timed.

    The first Argon2id verify in a thread costs about 10 ms more than the
    next ones: its 19 MiB buffer comes from that thread's fresh malloc arena,
    so every page of it faults in once (measured with 8 live threads: ~4,900
    minor faults and 26-31 ms for each thread's first verify, 17 ms and no
    faults for its later ones). A server thread pays this once in its life,
    but a timed login right after start may land on a fresh thread and be a
    10 ms outlier. Logging in from ``threads`` clients at once, twice, puts a
    login on every thread first.
    """
    barrier = threading.Barrier(threads)

    def client() -> None:
        c = Client(base)
        for _ in range(2):
            barrier.wait()
            login(c)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def login_cost(secure: str, bare: str, rounds: int, threads: int) -> tuple[float, float, float]:
    """Medians, in seconds, of one POST /login on secure_app, the same on the bare app, one verify.

    The three alternate in every round, after every server thread has done a
    login (``warm_threads``); the servers are otherwise idle, and the verify
    runs in this process at the configured cost.
    """
    # The bare app's hasher and hash: the configured cost, built in one place.
    HASHER.verify(PASSWORD_HASH, PASSWORD)  # this process's own first verify, untimed
    warm_threads(_secure_login, secure, threads)
    warm_threads(_bare_login, bare, threads)
    c_secure, c_bare = Client(secure), Client(bare)
    logins, bare_logins, verifies = [], [], []
    for _ in range(rounds):
        logins.append(_secure_login(c_secure))
        bare_logins.append(_bare_login(c_bare))
        start = time.perf_counter()
        HASHER.verify(PASSWORD_HASH, PASSWORD)
        verifies.append(time.perf_counter() - start)
    return statistics.median(logins), statistics.median(bare_logins), statistics.median(verifies)


def server_times(server: Gunicorn, last: int) -> list[float]:
    """Seconds the server itself spent on its ``last`` successful logins (its access log)."""
    times = [int(us) / 1e6 for us in LOGIN_LINE.findall(server.output())]
    if len(times) < last:
        raise SystemExit("the access log lacks the timed logins: did gunicorn.conf.py change?")
    return times[-last:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--login-rounds", type=int, default=31)
    parser.add_argument(
        "--limits", action="store_true", help="rate limits on, as in production (see above)"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with_redis = redis_server_path() is not None
    if not with_redis:
        print("redis-server is not installed (apt-get install redis-server): one worker only")

    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    script = tmp / "cookie.lua"
    script.write_text(WRK_SCRIPT)
    bare_args = ["bench.bare_app:app", *LOG_ARGS]
    secure_env = LIMITS_ENV if args.limits else BENCH_ENV
    # (configuration, the baseline, the one measured against it, its target ratio)
    contenders: list[tuple[str, Contender, Contender, float]] = []
    with ExitStack() as stack:
        configs = [("1 worker", 1, {})]
        if with_redis:
            redis = stack.enter_context(Redis(tmp / "redis"))
            configs.append(
                (
                    f"{args.workers} workers+Redis",
                    args.workers,
                    {"FLASK_RATELIMIT_STORAGE_URI": redis.uri},
                )
            )
        login_servers: tuple[Gunicorn, Gunicorn] | None = None  # (secure, bare), one worker each
        for name, workers, extra in configs:
            bare = stack.enter_context(
                Gunicorn(tmp / f"bare{workers}", env=BENCH_ENV, args=bare_args, workers=workers)
            )
            secure = stack.enter_context(
                Gunicorn(
                    tmp / f"secure{workers}",
                    env={**secure_env, **extra},
                    args=LOG_ARGS,
                    workers=workers,
                )
            )
            session = log_in(secure.url)
            cookie = "session=" + session.cookies["session"]
            login_servers = login_servers or (secure, bare)
            for page, bare_path, secure_path, anon in (
                ("/second", "/second", "/second", True),
                ("account", "/account-details", "/account-details", False),
            ):
                b_page = requests.get(bare.url + bare_path).text
                s_page = (requests if anon else session).get(secure.url + secure_path).text
                if not same_html(s_page, b_page):
                    print(f"warning: {page} HTML differs between bare and secure_app")
                contenders.append(
                    (
                        f"{page}, {name}",
                        Contender("bare", bare.url + bare_path, server=bare),
                        Contender(
                            "secure", secure.url + secure_path, "" if anon else cookie, secure
                        ),
                        0.85 if anon else 0.75,
                    )
                )
            if workers == 1 and postgres_bin() is not None:
                contenders.append(on_postgres(stack, tmp, secure_env, secure, cookie))

        every = [c for _, b, s, _ in contenders for c in (b, s)]
        for c in every:  # warm-up: imports, template compilation, caches
            wrk(c.url, 1, args.connections, script, c.cookie)
        for i in range(args.rounds):
            for c in every if i % 2 == 0 else reversed(every):
                c.runs.append(c.measure(args.seconds, args.connections, script))
        assert login_servers is not None
        threads = int(os.environ.get("GUNICORN_THREADS", "8"))  # gunicorn.conf.py's default
        login, bare_login, verify = login_cost(
            login_servers[0].url, login_servers[1].url, args.login_rounds, threads
        )
        server_login = statistics.median(server_times(login_servers[0], args.login_rounds))
        bare_server_login = statistics.median(server_times(login_servers[1], args.login_rounds))

    print_table(
        contenders, args, LoginCost(verify, server_login, bare_server_login, login, bare_login)
    )
    bad = sum(r.bad for c in every for r in c.runs)
    if bad:
        for label, *pair, _ in contenders:
            for c in pair:
                if sum(r.bad for r in c.runs):
                    print(f"  {label}, {c.label}: {sum(r.bad for r in c.runs)} bad responses")
        print(f"FAILED: {bad} responses were errors or not 2xx/3xx")
        return 1
    return 0


@dataclass
class LoginCost:
    """Medians in seconds: one verify, and one POST /login (secure, bare) seen by each side."""

    verify: float
    server: float  # the server's own time for the request, from its access log
    bare_server: float
    client: float  # what a client over loopback waits, its own time included
    bare_client: float


def print_table(contenders, args, login: LoginCost) -> None:
    print(
        f"\nwrk -t1 -c{args.connections}, {args.rounds} alternating rounds of "
        f"{args.seconds:g} s, medians; {os.cpu_count()} CPUs; secure_app's rate limits "
        f"{'on (--limits)' if args.limits else 'off'}\n"
    )
    head = (
        f"{'page, configuration':<28} {'app':<7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'CPU us':>7} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for label, bare, secure, target in contenders:
        ratio = secure.median("rps") / bare.median("rps")
        verdict = f"{ratio:6.2f} {'ok' if ratio >= target else 'MISS'}"
        for c, extra in ((bare, ""), (secure, verdict)):
            print(
                f"{label:<28} {c.label:<7} {c.median('rps'):7.0f} {c.median('p50'):7.2f} "
                f"{c.median('p99'):7.2f} {c.median('cpu_us'):7.0f} {extra}"
            )
    print(
        "\nratio: secure_app / bare requests per second, same configuration "
        "(targets: /second >= 0.85, account >= 0.75);\n"
        "PostgreSQL row: secure_app on PostgreSQL / on the text database (target >= 0.8);\n"
        "CPU us: CPU time of the gunicorn processes per request, which hardly moves "
        "when other\nprograms share the machine."
    )
    ratio = login.server / login.verify
    ms = {k: v * 1000 for k, v in vars(login).items()}
    print(
        f"\nlogin cost, medians of {args.login_rounds} logins after one on every server thread, "
        f"1 worker, {ARGON2_DEFAULTS}:\n"
        f"  one bare Argon2id verify, in this process: {ms['verify']:.1f} ms\n"
        f"  one POST /login, the server's own time (access log): secure {ms['server']:.1f} ms, "
        f"ratio to the verify {ratio:.2f} {'ok' if ratio <= 1.2 else 'MISS'} (target <= 1.2); "
        f"bare app {ms['bare_server']:.1f} ms\n"
        f"  one POST /login as a client waits (loopback): secure {ms['client']:.1f} ms "
        f"({login.client / login.verify:.2f}x the verify), bare app {ms['bare_client']:.1f} ms "
        f"(secure / bare {login.client / login.bare_client:.2f})"
    )
    print(f"load average during the run: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
