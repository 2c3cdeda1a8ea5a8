"""Why the store writes into reserved space and never ``stat``-s on its hot path.

Run: ``.venv/bin/python bench/sync_writes.py`` (options: ``--writes N``).

Times one synced 700-byte write (a user record) in four ways, on a file in
``data/`` (the disk the store uses), alternating the ways in small batches so
that noise hits all alike:

* ``append``: ``O_APPEND | O_DSYNC``, the file grows on every write;
* ``reserved``: ``O_DSYNC`` writes into space written earlier (what the store does);
* ``reserved + stat``: the same with an ``os.stat`` of the file between writes,
  as a reader checking for changes would do;
* ``reserved + statx``: the same with a ``statx`` that asks only for the inode
  and size (``secure_app.store._identity``, what the store does);
* ``reserved + pread``: the same with a one-byte ``pread`` (what the store also does).

Prints p50 and mean per way and the ratio to ``reserved``; then the
``reserved`` write again with the CPU kept busy between writes for as long as
a login's Argon2id hash, as the store's write at login is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from secure_app.store.text import _identity

LINE = b'{"k":"x","v":{"bio":"' + b"b" * 670 + b'"}}\n'
RESERVE = 16 * 1024


class Reserved:
    """A file written like the store: into reserved space, growing by a fresh reserve."""

    def __init__(self, path: Path, between: Callable[[Reserved], None] | None) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o600)
        self.rfd = os.open(path, os.O_RDONLY)
        self.offset = self.size = 0
        self.between = between

    def write(self) -> None:
        if self.between:
            self.between(self)
        end = self.offset + len(LINE)
        if end <= self.size:
            os.pwrite(self.fd, LINE, self.offset)
        else:
            data = LINE + b" " * (RESERVE - 1) + b"\n"
            os.pwrite(self.fd, data, self.offset)
            self.size = self.offset + len(data)
        self.offset = end


class Append:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_DSYNC, 0o600)

    def write(self) -> None:
        os.write(self.fd, LINE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=4000, help="writes per way")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent / "data"
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        folder = Path(tmp)
        ways = {
            "append": Append(folder / "append"),
            "reserved": Reserved(folder / "reserved", None),
            "reserved + stat": Reserved(folder / "stat", lambda f: os.stat(f.path)),
            "reserved + statx": Reserved(folder / "statx", lambda f: _identity(f.path)),
            "reserved + pread": Reserved(folder / "pread", lambda f: os.pread(f.rfd, 1, f.offset)),
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        batch = 50
        for r in range(0, args.writes, batch):
            order = list(ways.items())
            for name, way in order if r // batch % 2 else order[::-1]:
                for _ in range(batch):
                    t = time.perf_counter()
                    way.write()
                    times[name].append(time.perf_counter() - t)
    base = statistics.median(times["reserved"])
    print(f"one synced {len(LINE)}-byte write, {args.writes} per way, in alternating batches")
    print(f"{'way':<18} {'p50 ms':>7} {'mean ms':>8} {'p50 / reserved':>15}")
    print("-" * 51)
    for name, lat in times.items():
        p50 = statistics.median(lat)
        mean = statistics.mean(lat)
        print(f"{name:<18} {p50 * 1000:>7.3f} {mean * 1000:>8.3f} {p50 / base:>14.2f}x")
    print(f"kernel {os.uname().release}")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        way = Reserved(Path(tmp) / "gap", None)
        for gap_ms in (0, 1, 5, 20):
            lat = []
            for _ in range(100):
                until = time.perf_counter() + gap_ms / 1000
                while time.perf_counter() < until:  # busy, like a hash, not asleep
                    pass
                t = time.perf_counter()
                way.write()
                lat.append(time.perf_counter() - t)
            p50 = statistics.median(lat) * 1000
            print(f"reserved, {gap_ms:>2} ms busy before each write: p50 {p50:.3f} ms")


if __name__ == "__main__":
    main()
