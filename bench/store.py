"""Benchmark: durable single-record updates in the text store, SQLite (WAL, FULL) and PostgreSQL.

Run: ``.venv/bin/python bench/store.py`` (options: ``--updates N``, ``--sizes 1000,10000``).

For each size the same users are loaded into every database, then the same
random sequence of read-modify-write updates runs against each, one at a time,
every one durable (fsync, or PostgreSQL's WAL flush at commit) before the next
starts. PostgreSQL is the app's own ``PostgresStore`` (a pooled connection over
loopback TCP, ``SELECT ... FOR UPDATE`` and ``UPDATE`` in one transaction) on a
throwaway server (Debian's ``postgresql`` package; skipped when it is missing).
Prints one table with updates/s, p50 and p99 latency, and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from secure_app.store import new_user
from secure_app.store.text import TextStore, encode_line

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/servers.py starts the throwaway PostgreSQL
from tests.servers import Postgres, postgres_bin  # noqa: E402

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


def load_store(folder: Path, users: int) -> TextStore:
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


def load_postgres(server: Postgres, users: int):
    """A fresh schema on the server, loaded with one COPY, behind the app's own PostgresStore."""
    import psycopg

    from secure_app.store.postgres import PostgresStore, _encode

    schema = f"bench_{users}"
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {schema}")
    store = PostgresStore(f"{server.url()}?options=-csearch_path%3D{schema}")
    with psycopg.connect(server.url(), autocommit=True) as conn:
        with conn.cursor().copy(f"COPY {schema}.users (username, record) FROM STDIN") as copy:
            for i in range(users):
                record = make_record(i)
                copy.write_row((record["username"], _encode(record)))
        conn.execute(f"VACUUM ANALYZE {schema}.users")
    assert len(store) == users
    return store


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


def bench_size(
    users: int, updates: int, seed: int, server: Postgres | None
) -> dict[str, tuple[float, float, float]]:
    rng = random.Random(seed)
    keys = [f"user{rng.randrange(users):06d}" for _ in range(updates)]
    results = {}
    with tempfile.TemporaryDirectory(dir=ROOT / "data") as tmp:
        store = load_store(Path(tmp) / "store", users)
        db = load_sqlite(Path(tmp) / "users.sqlite", users)
        pg = load_postgres(server, users) if server else None

        def store_one(key: str, n: int) -> None:
            store.update(key, lambda r: r.update(bio=f"update {n}", phone=f"+1 {n}"))

        def sqlite_one(key: str, n: int) -> None:
            sqlite_update(db, key, lambda r: r.update(bio=f"update {n}", phone=f"+1 {n}"))

        def postgres_one(key: str, n: int) -> None:
            pg.update(key, lambda r: r.update(bio=f"update {n}", phone=f"+1 {n}"))

        # Alternate in small batches, rotating the order, so that other load on
        # the machine, disk caches or background flushing favour no engine.
        engines = [("store", store_one), ("sqlite", sqlite_one)]
        if pg is not None:
            engines.append(("postgres", postgres_one))
        batch = 20
        latencies: dict[str, list[float]] = {name: [] for name, _ in engines}
        elapsed = dict.fromkeys(latencies, 0.0)
        for r, first in enumerate(range(0, len(keys), batch)):
            chunk = keys[first : first + batch]
            shift = r % len(engines)
            for name, fn in engines[shift:] + engines[:shift]:
                seconds, lat = timed(fn, chunk, first)
                elapsed[name] += seconds
                latencies[name] += lat
        for name in latencies:
            q = statistics.quantiles(latencies[name], n=100)
            results[name] = (len(keys) / elapsed[name], q[49] * 1000, q[98] * 1000)
        store.close()
        db.close()
        if pg is not None:
            pg.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=3000, help="updates per size and engine")
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = {}
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(Postgres()) if postgres_bin() else None
        if server is None:
            print("PostgreSQL is not installed (apt-get install postgresql): its rows are left out")
        for users in sizes:
            rows[users] = bench_size(users, args.updates, seed=users, server=server)

    engines = list(next(iter(rows.values())))
    print(
        f"durable single-record updates, {args.updates} per size and engine "
        f"(SQLite {sqlite3.sqlite_version}, WAL, synchronous=FULL"
        + (", PostgreSQL 15, synchronous_commit=on, loopback TCP)" if server else ")")
    )
    head = f"{'users':>8} |" + "".join(
        f" {name + ' upd/s':>13} {'p50 ms':>7} {'p99 ms':>7} |" for name in engines
    )
    head += " text/sqlite upd/s" + (" text/postgres upd/s" if "postgres" in engines else "")
    print(head)
    print("-" * len(head))
    for users, r in rows.items():
        cells = "".join(f" {r[e][0]:>13.0f} {r[e][1]:>7.3f} {r[e][2]:>7.3f} |" for e in engines)
        ratios = f" {r['store'][0] / r['sqlite'][0]:>16.2f}x"
        if "postgres" in r:
            ratios += f" {r['store'][0] / r['postgres'][0]:>18.2f}x"
        print(f"{users:>8} |{cells}{ratios}")
    first, last = sizes[0], sizes[-1]
    scale = rows[last]["store"][1] / rows[first]["store"][1]
    print(f"store p50 at {last} users / p50 at {first} users: {scale:.2f}x (target <= 1.5x)")
    ok = scale <= 1.5 and all(r["store"][0] >= r["sqlite"][0] for r in rows.values())
    print("targets met" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
