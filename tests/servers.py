"""Real servers for tests and benchmarks: gunicorn serving the app, redis-server, PostgreSQL.

Both bind to 127.0.0.1 on a free port and are stopped by whoever started them
(use them as context managers).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


class Gunicorn:
    """The app served the way ``make run`` serves it (gunicorn.conf.py), on a temporary data folder.

    ``env`` adds ``FLASK_*`` settings; ``args`` adds gunicorn flags (they win
    over gunicorn.conf.py).
    """

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        workers: int = 1,
    ) -> None:
        self.tmp = Path(tmp)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "FLASK_DATA_DIR": str(self.tmp / "data"),
            "FLASK_PHOTO_DIR": str(self.tmp / "photos"),
            "FLASK_INSTANCE_PATH": str(self.tmp / "instance"),
            **(env or {}),
        }
        self.args = args or []
        self.log = self.tmp / f"gunicorn-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Gunicorn:
        self.tmp.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"), *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port(self.port, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


class Redis:
    """A throwaway redis-server on a free loopback port, no persistence."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = Path(tmp)
        self.port = free_port()
        self.uri = f"redis://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Redis:
        exe = redis_server_path()
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl, or None when PostgreSQL is not installed.

    Debian's postgresql package keeps them off PATH, in /usr/lib/postgresql/<major>/bin
    (15 on bookworm); ``PG_BIN`` names another folder.
    """
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3])
    )
    if debian:
        return debian[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def require_postgres() -> None:
    """Skip the calling test where PostgreSQL is missing, except in CI, where that fails it."""
    import pytest

    if postgres_bin() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed, and CI must run the PostgreSQL tests")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")


class Postgres:
    """A throwaway PostgreSQL cluster in its own temporary folder, on a free loopback port.

    The app connects over TCP as the role ``secure_app`` with a password
    (scram-sha-256), which owns its databases and is no superuser: the least
    privilege a deployment should give the app (SECURITY.md). The superuser
    ``postgres`` is reached only through the cluster's own Unix socket.
    PostgreSQL refuses to run as root, so as root the cluster is run as the
    ``postgres`` system user, which the package creates.
    """

    PASSWORD = "test-only-password"
    # Shared by the worker roles (add_workers): PostgreSQL's default max_connections (100)
    # less some for the superuser and the roles a test makes of its own.
    WORKER_CONNECTIONS = 90

    def __init__(self) -> None:
        self.port = free_port()
        self.tmp: Path | None = None
        self.bin = postgres_bin()
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.owned = True
        self.user = "secure_app"
        self._claim: int | None = None  # the locked file of a worker role (see add_workers)

    @classmethod
    def attached(cls, address: str) -> Postgres:
        """A server someone else started and will stop: ``address`` is ``"<port>:<folder>"``,
        as ``str(server)`` gives it (the mutation runs share one server across many pytest runs)."""
        server = cls()
        port, folder = address.split(":", 1)
        server.port, server.tmp, server.owned = int(port), Path(folder), False
        server._claim_a_worker_role()
        return server

    def add_workers(self, count: int) -> None:
        """Make ``count`` login roles that share ``secure_app``'s rights, each limited to its
        share of the connection slots, for the pytest runs that attach to this server at once.

        One mutant can open connections without bound (a new pool per request): on a shared
        role it took every slot for seconds, and the other worker's mutants failed at once
        with "remaining connection slots are reserved", killed by the environment, not by a
        test. Each attached run claims a free role (``attached``), so one worker's runaway
        mutant exhausts its own share only.
        """
        assert self.tmp is not None
        limit = self.WORKER_CONNECTIONS // count
        for i in range(count):
            self.admin(
                f"CREATE ROLE secure_app_w{i} LOGIN PASSWORD '{self.PASSWORD}' "
                f"IN ROLE secure_app CONNECTION LIMIT {limit}"
            )
            (self.tmp / f"worker-{i}.lock").touch()

    def _claim_a_worker_role(self) -> None:
        """Connect as the first worker role no other attached run holds, if there are any.

        The claim is a lock on the role's file, held until ``release`` or the process's
        end (a worker killed by a timeout frees its role with it).
        """
        assert self.tmp is not None
        for lock in sorted(self.tmp.glob("worker-*.lock")):
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._claim, self.user = fd, "secure_app_w" + lock.stem.partition("-")[2]
            return

    def release(self) -> None:
        """Give back the worker role this run claimed, if any."""
        if self._claim is not None:
            os.close(self._claim)
            self._claim, self.user = None, "secure_app"

    def __str__(self) -> str:
        return f"{self.port}:{self.tmp}"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.run_as, *args], check=True, capture_output=True, timeout=120)

    def __enter__(self) -> Postgres:
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.tmp = Path(tempfile.mkdtemp(prefix="secure_app-pg-"))
        if self.run_as:
            shutil.chown(self.tmp, "postgres", "postgres")
        secret = self.tmp / "pwfile"
        secret.write_text("unused\n")  # initdb needs one for scram; the superuser uses the socket
        if self.run_as:
            shutil.chown(secret, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=peer" if self.run_as else "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={secret}",
            "-E",
            "UTF8",
            "--locale=C",
        )
        self.start()
        self.admin(
            f"CREATE ROLE secure_app LOGIN PASSWORD '{self.PASSWORD}' NOSUPERUSER NOCREATEROLE",
            "CREATE DATABASE secure_app OWNER secure_app",
        )
        return self

    @property
    def data(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "data"

    def start(self) -> None:
        """Start the cluster (again), on the same port; wait until it accepts connections."""
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.tmp}"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
            str(self.tmp / "log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster: ``fast`` ends every session cleanly, ``immediate`` is a crash."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def admin(self, *statements: str, database: str = "postgres") -> None:
        """Run statements as the superuser, through the cluster's own socket."""
        for statement in statements:
            self._run(
                str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.tmp),
                "-p", str(self.port), "-U", "postgres", "-d", database, "-c", statement,
            )  # fmt: skip

    def url(self, database: str = "secure_app") -> str:
        return f"postgresql://{self.user}:{self.PASSWORD}@127.0.0.1:{self.port}/{database}"

    def __exit__(self, *exc: object) -> None:
        if self.tmp is None or not self.owned:
            return
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped by the test
        shutil.rmtree(self.tmp, ignore_errors=True)
