"""Real servers for tests and benchmarks: gunicorn serving the app, and redis-server.

Both bind to 127.0.0.1 on a free port and are stopped by whoever started them
(use them as context managers).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
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
