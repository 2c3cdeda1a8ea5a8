"""Hostile profile photos: what each costs to decode, and what eight at once cost everyone else.

Part one builds a hostile corpus (tests/images.py): the audit's two files of
issue 13 (a 50-megapixel lossless WebP of a few bytes, a progressive JPEG
with thousands of repeated scans), a 50 MP baseline JPEG, CMYK, 16-bit and
palette PNGs, many-frame animated WebP and APNG, chunk, segment and text
floods, and each format at the largest size it is still accepted at. Each
file is handed to ``uploads.reencode`` in a fresh interpreter, which reports
the peak RSS it added (``VmHWM``, so C allocations count; ``ru_maxrss`` would
start from this process's own peak, which Linux keeps across exec) and its CPU.

Part two serves the app the way ``make run`` does (gunicorn with
gunicorn.conf.py) on a free loopback port and a temporary data folder, logs
in one user, and measures ``GET /second`` one request after another: first
with nothing else running, then while eight threads of that one account
upload hostile files back to back. The rate limits are off
(``FLASK_RATELIMIT_ENABLED=false``), so the per-user upload limit does not
hide the decoder's cost.

Targets (issue 13): every file at most 160 MiB added RSS and 2 s of CPU;
``GET /second`` p99 under 1 s during the attack. The run stops by itself.

    .venv/bin/python bench/uploads.py [--seconds 8] [--uploaders 8]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# tests/servers.py (gunicorn for benchmarks) and tests/images.py live in the repository.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402

import requests  # noqa: E402

import images  # noqa: E402
from tests.servers import Gunicorn  # noqa: E402

MAX_ADDED_RSS_MIB = 160
MAX_CPU_S = 2.0
MAX_P99_MS = 1000
PASSWORD = "correct horse battery staple glacier"
CSRF_RE = re.compile(
    r'name="csrf_token" type="hidden" value="([^"]+)"|name="csrf_token" value="([^"]+)"'
)

CORPUS: dict[str, Callable[[], bytes]] = {
    # the audit's files
    "webp lossless 12000x4166": lambda: images.webp_lossless_bomb((12_000, 4_166)),
    "jpeg 3000 scans 12000x4166": lambda: images.jpeg_scan_bomb((12_000, 4_166), 3_000),
    "png rgb 12000x4166": lambda: images.png_raw((12_000, 4_166)),
    # the rest of the brief's list, and worse
    "jpeg baseline 50mp": lambda: images.jpeg_large(),
    "jpeg cmyk baseline 50mp": lambda: images.jpeg_large(mode="CMYK"),
    "jpeg progressive 50mp": lambda: images.jpeg_large(progressive=True),
    "jpeg progressive 4:4:4 50mp": lambda: images.jpeg_large(progressive=True, subsampling=0),
    "jpeg 1M comment segments": lambda: images.jpeg_segment_flood(1_000_000),
    # found by the live attack: one scan, yet libjpeg buffers every coefficient
    "jpeg prog DC scan only cmyk 50mp": lambda: images.jpeg_first_scan_only(
        (12_000, 4_166), mode="CMYK"
    ),
    "jpeg 1-component scan 50mp": lambda: images.jpeg_one_component_scan((12_000, 4_166)),
    "png rgba 16-bit 50mp": lambda: images.png_raw((12_000, 4_166), bit_depth=16, color_type=6),
    "png grey 16-bit 50mp": lambda: images.png_raw((12_000, 4_166), bit_depth=16, color_type=0),
    "png palette 50mp": lambda: images.png_raw((12_000, 4_166), color_type=3),
    "png 300k empty chunks": lambda: images.png_raw((64, 64), extra_chunks=300_000),
    "png 150k 1-byte IDATs": lambda: images.png_raw((2_000, 2_000), chunk=1),
    "png 64 zTXt of 1 MiB": lambda: images.png_raw((64, 64), text_bombs=64),
    "apng 20k frames": lambda: images.png_raw((2_000, 2_000), frames=20_000),
    "webp lossy 12000x4166": lambda: images.webp_lossy_large((12_000, 4_166)),
    "webp animated 4000^2 20k fr": lambda: images.webp_animated((4_000, 4_000), 20_000),
    # each at the largest size still accepted: the worst an upload can cost now
    "limit: jpeg 32 scans 30.8mp": lambda: images.jpeg_scan_bomb((7_000, 4_400), 32),
    "limit: jpeg prog 4:4:4 13.7mp": lambda: images.jpeg_large(
        (3_700, 3_700), progressive=True, subsampling=0
    ),
    "limit: jpeg cmyk prog 10.5mp": lambda: images.jpeg_large(
        (3_000, 3_500), mode="CMYK", progressive=True
    ),
    "limit: jpeg 12000x2047": lambda: images.jpeg_large((12_000, 2_047)),
    "limit: jpeg prog DC only 4:2:0 30mp": lambda: images.jpeg_first_scan_only(
        (7_000, 4_300), subsampling=2
    ),
    "limit: png rgb 25.1mp": lambda: images.png_raw((6_000, 4_190)),
    "limit: png rgba 16-bit 12.6mp": lambda: images.png_raw(
        (3_000, 4_190), bit_depth=16, color_type=6
    ),
    "limit: png grey 16-bit 16.8mp": lambda: images.png_raw(
        (4_000, 4_190), bit_depth=16, color_type=0
    ),
    "limit: png palette+tRNS 10.9mp": lambda: images.png_raw(
        (2_600, 4_190), color_type=3, transparency=True
    ),
    "limit: png la 12.6mp": lambda: images.png_raw((3_000, 4_190), color_type=4),
    "limit: apng 4900 frames": lambda: images.png_raw((2_000, 2_000), frames=4_900),
    "limit: webp lossless 5.0mp": lambda: images.webp_lossless_bomb((2_400, 2_090)),
    "webp anim 5mp 100k frames": lambda: images.webp_animated((2_400, 2_090), 100_000),
    "limit: webp anim 5mp 9990 fr": lambda: images.webp_animated((2_400, 2_090), 9_990),
}
# What the eight uploaders send, one round each.
ATTACKS = {
    "webp lossless bomb": ["webp lossless 12000x4166"],
    "jpeg scan bomb": ["jpeg 3000 scans 12000x4166"],
    "costliest accepted files": [
        "limit: jpeg 32 scans 30.8mp",
        "limit: png rgb 25.1mp",
        "limit: png rgba 16-bit 12.6mp",
        "limit: webp anim 5mp 9990 fr",
        "limit: jpeg cmyk prog 10.5mp",
        "jpeg baseline 50mp",
    ],
}


def measure(path: Path) -> dict:
    """Run one reencode() in a fresh interpreter and return what it cost."""
    got = images.measure_reencode(path, timeout=120)
    if got["result"] != "accepted":
        got["result"] = "refused: " + got["result"]
    return got


def cost_table(corpus: dict[str, Path]) -> bool:
    """Print one row per file; return whether every file met the targets."""
    print(f"{'file':32} {'bytes':>9} {'RSS MiB':>8} {'CPU s':>6}  outcome")
    print("-" * 100)
    ok = True
    for name, path in corpus.items():
        got = measure(path)
        met = got["rss_mib"] <= MAX_ADDED_RSS_MIB and got["cpu_s"] <= MAX_CPU_S
        ok &= met
        outcome = got["result"] if len(got["result"]) < 60 else got["result"][:57] + "..."
        print(
            f"{name:32} {path.stat().st_size:>9,} {got['rss_mib']:>8.1f} "
            f"{got['cpu_s']:>6.2f}  {outcome}{'' if met else '  <-- over target'}",
            flush=True,
        )
    return ok


def token(session: requests.Session, url: str) -> str:
    match = CSRF_RE.search(session.get(url, timeout=30).text)
    assert match, f"no csrf_token on {url}"
    return match.group(1) or match.group(2)


def log_in(base: str) -> requests.Session:
    """Register and log in one user through the real forms."""
    session = requests.Session()
    form = {"username": "mallory", "password": PASSWORD, "confirm": PASSWORD}
    session.post(
        f"{base}/register", data={**form, "csrf_token": token(session, f"{base}/register")}
    )
    form = {"username": "mallory", "password": PASSWORD}
    session.post(f"{base}/login", data={**form, "csrf_token": token(session, f"{base}/login")})
    assert session.get(f"{base}/account-details", allow_redirects=False, timeout=30).ok
    return session


def uploader(base, cookies, files, stop, outcomes) -> None:
    """Upload ``files`` in turn from one logged-in session until ``stop`` is set."""
    session = requests.Session()
    session.cookies.update(cookies)
    csrf = token(session, f"{base}/account-details")
    i = 0
    while not stop.is_set():
        name, data = files[i % len(files)]
        i += 1
        fields = {"csrf_token": csrf, "full_name": "M", "email": "m@example.org"}
        try:
            response = session.post(
                f"{base}/account-details",
                data=fields,
                files={"photo": ("me.jpg", data, "image/jpeg")},
                allow_redirects=False,
                timeout=60,
            )
        except requests.RequestException:
            outcomes["error"] += 1
            continue
        if response.status_code == 303:
            outcomes["accepted"] += 1
        elif "busy" in response.text:
            outcomes["busy"] += 1
        else:
            outcomes[f"refused {response.status_code}"] += 1


def latencies(base: str, seconds: float) -> list[float]:
    """Time GET /second one request after another for ``seconds``; milliseconds each."""
    session = requests.Session()
    times = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        assert session.get(f"{base}/second", timeout=120).status_code == 200
        times.append((time.perf_counter() - start) * 1000)
    return times


def worker_hwm_mib(server: Gunicorn) -> float:
    """Peak RSS so far of gunicorn's worker process (VmHWM), MiB."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    status = Path(f"/proc/{children[0]}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def live_table(corpus: dict[str, Path], seconds: float, uploaders: int) -> bool:
    print(
        f"\nGET /second, one at a time for {seconds:g} s, against {uploaders} uploaders "
        "on one account (gunicorn.conf.py: 1 worker, gthread)"
    )
    print(
        f"{'while':26} {'requests':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'worker peak MiB':>15}  uploads"
    )
    print("-" * 110)
    ok = True
    with (
        tempfile.TemporaryDirectory() as tmp,
        Gunicorn(Path(tmp), env={"FLASK_RATELIMIT_ENABLED": "false"}) as server,
    ):
        session = log_in(server.url)
        rounds = [("nothing else (baseline)", [])] + list(ATTACKS.items())
        for label, names in rounds:
            files = [(n, corpus[n].read_bytes()) for n in names]
            stop, outcomes = threading.Event(), Counter()
            threads = [
                threading.Thread(
                    target=uploader, args=(server.url, session.cookies, files, stop, outcomes)
                )
                for _ in range(uploaders if files else 0)
            ]
            for thread in threads:
                thread.start()
            time.sleep(1 if files else 0)  # let the attack fill the decode slots first
            times = latencies(server.url, seconds)
            stop.set()
            for thread in threads:
                thread.join(timeout=90)
            cuts = statistics.quantiles(times, n=100, method="inclusive")
            ok &= not files or cuts[98] < MAX_P99_MS
            summary = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "-"
            print(
                f"{label:26} {len(times):>8} {cuts[49]:>7.1f} {cuts[98]:>7.1f} "
                f"{max(times):>7.1f} {worker_hwm_mib(server):>15.0f}  {summary}",
                flush=True,
            )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8, help="length of each live round")
    parser.add_argument("--uploaders", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = {}
        for i, (name, build) in enumerate(CORPUS.items()):
            corpus[name] = Path(tmp) / f"{i:02d}.bin"
            corpus[name].write_bytes(build())
        print("one reencode() per file, each in a fresh interpreter (added peak RSS, CPU)")
        costs_ok = cost_table(corpus)
        live_ok = live_table(corpus, args.seconds, args.uploaders)
    print(
        f"\nper file <= {MAX_ADDED_RSS_MIB} MiB and {MAX_CPU_S:g} s CPU: "
        f"{'met' if costs_ok else 'NOT met'}; GET /second p99 < {MAX_P99_MS} ms under "
        f"attack: {'met' if live_ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
