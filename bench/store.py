"""Benchmark: durable single-record updates in the text store against SQLite (WAL, FULL sync).

Run: ``.venv/bin/python bench/store.py`` (options: ``--updates N``, ``--sizes 1000,10000``).

For each size the same users are loaded into both databases, then the same
random sequence of read-modify-write updates runs against each, one at a time,
every one durable (fsync) before the next starts. Prints one table with
updates/s, p50 and p99 latency, and the store-to-SQLite ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from secure_app.store import new_user
from secure_app.store.text import TextStore, encode_line

FAKE_HASH = "$argon2id$v=19$m=65536,t=3,p=4$" + "A" * 22 + "$" + "B" * 43


def make_record(i: int) -> dict:
    """A user record of realistic size: hash, profile fields and two live sessions."""
    record = new_user(f"user{i:06d}", FAKE_HASH)
    record.update(
        full_name=f"Person Number {i}",
        email=f"user{i}@example.org",
        phone="+44 20 7946 0000",
        bio="Likes long walks and short benchmarks. " * 4,
        sessions={f"{i:064x}": 1_700_000_000, f"{i + 1:064x}": 1_700_000_100},
    )
    return record


def load_store(folder: Path, users: int) -> Store:
    """Seed the file in the store's line format, in one write, then open it."""
    folder.mkdir()
    with open(folder / "users.jsonl", "wb") as f:
        for i in range(users):
            record = make_record(i)
            f.write(encode_line(record["username"], record))
        f.flush()
        os.fsync(f.fileno())
    store = TextStore(folder)
    assert len(store) == users
    return store


def load_sqlite(path: Path, users: int) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE users (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO users VALUES (?, ?)",
        ((f"user{i:06d}", json.dumps(make_record(i))) for i in range(users)),
    )
    db.execute("COMMIT")
    return db


def sqlite_update(db: sqlite3.Connection, key: str, change: Callable[[dict], None]) -> None:
    """The same read-modify-write as TextStore.update, as one SQLite transaction."""
    db.execute("BEGIN IMMEDIATE")
    (raw,) = db.execute("SELECT v FROM users WHERE k = ?", (key,)).fetchone()
    record = json.loads(raw)
    change(record)
    db.execute("UPDATE users SET v = ? WHERE k = ?", (json.dumps(record), key))
    db.execute("COMMIT")


def timed(run_one: Callable[[str, int], None], keys: list[str], first: int):
    """Run the updates one after another; return the total seconds and each latency."""
    latencies = []
    start = time.perf_counter()
    for n, key in enumerate(keys, first):
        t = time.perf_counter()
        run_one(key, n)
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - start, latencies


def bench_size(users: int, updates: int, seed: int) -> dict[str, tuple[float, float, float]]:
    rng = random.Random(seed)
    keys = [f"user{rng.randrange(users):06d}" for _ in range(updates)]
    results = {}
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent / "data") as tmp:
        store = load_store(Path(tmp) / "store", users)
        db = load_sqlite(Path(tmp) / "users.sqlite", users)

        def store_one(key: str, n: int) -> None:
            store.update(key, lambda r: r.update(bio=f"update {n}", phone=f"+1 {n}"))

        def sqlite_one(key: str, n: int) -> None:
            sqlite_update(db, key, lambda r: r.update(bio=f"update {n}", phone=f"+1 {n}"))

        # Alternate in small batches, so that other load on the machine, disk
        # caches or background flushing favour neither side.
        batch = 20
        latencies: dict[str, list[float]] = {"store": [], "sqlite": []}
        elapsed = {"store": 0.0, "sqlite": 0.0}
        for r, first in enumerate(range(0, len(keys), batch)):
            chunk = keys[first : first + batch]
            order = [("store", store_one), ("sqlite", sqlite_one)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                seconds, lat = timed(fn, chunk, first)
                elapsed[name] += seconds
                latencies[name] += lat
        for name in ("store", "sqlite"):
            q = statistics.quantiles(latencies[name], n=100)
            results[name] = (len(keys) / elapsed[name], q[49] * 1000, q[98] * 1000)
        store.close()
        db.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=3000, help="updates per size and engine")
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = {}
    for users in sizes:
        rows[users] = bench_size(users, args.updates, seed=users)

    header = (
        f"{'users':>8} | {'store upd/s':>11} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'sqlite upd/s':>12} {'p50 ms':>7} {'p99 ms':>7} | {'upd/s ratio':>11} {'p50 ratio':>9}"
    )
    print(
        f"durable single-record updates, {args.updates} per size and engine "
        f"(SQLite {sqlite3.sqlite_version}, WAL, synchronous=FULL)"
    )
    print(header)
    print("-" * len(header))
    for users, r in rows.items():
        s, q = r["store"], r["sqlite"]
        print(
            f"{users:>8} | {s[0]:>11.0f} {s[1]:>7.3f} {s[2]:>7.3f} | "
            f"{q[0]:>12.0f} {q[1]:>7.3f} {q[2]:>7.3f} | {s[0] / q[0]:>10.2f}x {s[1] / q[1]:>8.2f}x"
        )
    first, last = sizes[0], sizes[-1]
    scale = rows[last]["store"][1] / rows[first]["store"][1]
    print(f"store p50 at {last} users / p50 at {first} users: {scale:.2f}x (target <= 1.5x)")
    ok = scale <= 1.5 and all(r["store"][0] >= r["sqlite"][0] for r in rows.values())
    print("targets met" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
