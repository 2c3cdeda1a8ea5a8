"""Mutation score of each security module against the tests that mirror it (``make mutation``).

Usage: ``python scripts/mutation.py [MODULE ...] [--jobs N] [--report | --recheck]`` (default:
every module in MODULES; ``--report`` prints the table of the last run again, with the current
equivalents; ``--recheck`` re-runs only the last run's undetected mutants with the current tests).

For each module this builds ``mutants/<module>/``: links to the code, tests, templates and
static files plus a ``pyproject.toml`` whose ``[tool.mutmut]`` mutates that one module and runs
only its tests (never the ``slow`` or ``browser`` ones). ``mutmut run`` then works in there
(its copy is ``mutants/<module>/mutants/``), from scratch each time, so a number never comes
from a stale cache. The results are read from mutmut's ``.meta`` file.

Score = (killed + timed out) / (mutants - declared equivalents). A timeout is counted as
detected, mutmut's own convention: the mutant made the tests run past 5 times their normal
time (an endless loop; see TIMEOUT_MULTIPLIER), which a real run would notice. "No tests"
(the mutated function ran in none of the selected tests) and "suspicious" count as not
detected.

Declared equivalents live in tests/mutation_equivalents.txt: one mutant name per line, then
its reason. Only survivors are counted out; a listed mutant that was killed is reported so the
list can be pruned. A reason starting with "import-time:" marks a mutant mutmut cannot test
(its function runs only at import, or its effect shows only in a forked child or a measuring
subprocess) and that was checked by hand; those get their own column, and count out whether
mutmut says "survived" or "no tests".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> (file to mutate, tests that mirror it). Plain data: edit it to point elsewhere.
MODULES: dict[str, tuple[str, list[str]]] = {
    "passwords": ("secure_app/passwords.py", ["tests/test_passwords.py"]),
    # The security page's tests are the ones that list and end sessions (sessions.listing...).
    "sessions": (
        "secure_app/sessions.py",
        ["tests/test_sessions.py", "tests/test_security_page.py"],
    ),
    "uploads": ("secure_app/uploads.py", ["tests/test_uploads.py"]),
    "forms": (
        "secure_app/forms.py",
        ["tests/test_forms.py", "tests/test_fuzz_forms.py", "tests/test_auth.py"],
    ),
    # Change password, delete account and the timeouts are tested with the sessions they end;
    # which attempts count against the login limits, in the rate limit tests; what the
    # handlers write to the audit trail, in the audit tests. (Slow tests are never selected.)
    "auth": (
        "secure_app/auth.py",
        [
            "tests/test_auth.py",
            "tests/test_sessions.py",
            # Only the login, register and change-password limits (the others start servers).
            "tests/test_rate_limits.py::test_user_limit_counts_only_failed_logins",
            "tests/test_rate_limits.py::test_right_password_is_refused_while_the_user_limit_holds",
            "tests/test_rate_limits.py::test_register_limit_refuses_and_stores_nothing",
            "tests/test_rate_limits.py::test_change_password_limit_stops_guessing_the_current_password",
            # A login form that is not even valid counts against the per-user limit too.
            "tests/test_rate_limits.py::test_junk_usernames_share_one_bounded_limiter_key",
            # A password login is listed "Signed in with your password" (begin_session's method).
            "tests/test_security_page.py::test_events_are_listed_newest_first_with_time_and_address",
            "tests/test_audit.py",
            # The compare-and-set on the password and the session, under concurrent writes.
            "tests/test_races.py",
            "tests/test_account_email.py::test_a_password_change_is_notified_to_the_verified_address",
        ],
    ),
    # The contract and the state machine run on both backends (PostgreSQL: a server this
    # script starts once for every run, see main); the faults that stop a server are slow tests.
    "store_text": (
        "secure_app/store/text.py",
        [
            "tests/test_store.py",
            "tests/test_store_contract.py",
            "tests/test_store_faults.py",
            "tests/test_store_stateful.py",
        ],
    ),
    # Not the state machine here: on PostgreSQL it takes 15 s, and every mutant the contract
    # tests leave alive (the equivalents, mostly SQL in another case) would pay it each time.
    "store_postgres": (
        "secure_app/store/postgres.py",
        ["tests/test_store_contract.py", "tests/test_store_postgres.py"],
    ),
    "transfer": ("secure_app/store/transfer.py", ["tests/test_transfer.py"]),
    "mfa": ("secure_app/mfa.py", ["tests/test_mfa.py"]),
    "two_factor": (
        "secure_app/two_factor.py",
        ["tests/test_two_factor.py", "tests/test_two_factor_races.py"],
    ),
    # Re-authentication is tested with the factors it checks; its races (a code spent twice at
    # once, a session ended mid-check), with the second factor's.
    "reauth": (
        "secure_app/reauth.py",
        [
            "tests/test_two_factor.py",
            "tests/test_two_factor_races.py",
            "tests/test_passkeys.py",
        ],
    ),
    "passkeys": ("secure_app/passkeys.py", ["tests/test_passkeys.py"]),
    "recovery": (
        "secure_app/recovery.py",
        ["tests/test_recovery.py", "tests/test_recovery_fuzz.py"],
    ),
    "events": ("secure_app/events.py", ["tests/test_security_page.py"]),
    "security_page": ("secure_app/security_page.py", ["tests/test_security_page.py"]),
    "account": (
        "secure_app/account.py",
        [
            "tests/test_account.py",
            "tests/test_account_email.py",
            # What the page writes to the audit trail for a refused or a busy photo.
            "tests/test_audit.py::test_a_refused_and_a_busy_photo_are_audited_with_the_user_and_the_reason",
        ],
    ),
}

EQUIVALENTS = ROOT / "tests" / "mutation_equivalents.txt"
# A mutant times out when its tests run past this many times their measured time (plus a
# second). mutmut's default, 15, made each endless loop cost 40 s or so; PIT and Stryker
# allow 1.25 to 1.5 times plus a few seconds. 5 is still far from a slow-but-finishing test.
TIMEOUT_MULTIPLIER = 5.0
# A listed mutant whose reason starts with this is not equivalent but out of mutmut's reach: its
# function runs only at import (a field factory, a decorator factory), before mutmut activates a
# mutant, and mutmut ties it to whichever test was running then; or it runs only in a forked child,
# or what it changes is measured only in a subprocess. Counted in their own column.
IMPORT_TIME = "import-time:"
WORK = ROOT / "mutants"
# mutmut, with its timeouts fixed to signal only their own worker (see that file).
MUTMUT = Path(__file__).resolve().parent / "mutmut_run.py"
# What the tests need beside the code (the app finds templates and public/ next to the package).
LINKED = ["secure_app", "tests", "templates", "public"]


def load_equivalents() -> dict[str, str]:
    """Mutant name -> reason, from the equivalents file (``#`` starts a comment)."""
    if not EQUIVALENTS.exists():
        return {}
    found = {}
    for line in EQUIVALENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, reason = line.partition(" ")
            found[name] = reason.strip()
    return found


def mutmut_config(module: str) -> str:
    path, tests = MODULES[module]
    quoted = ", ".join(json.dumps(t) for t in tests)
    return f"""
[tool.mutmut]
source_paths = ["secure_app"]
only_mutate = [{json.dumps(path)}]
also_copy = ["templates", "public"]
pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-m", "not slow and not browser"]
pytest_add_cli_args_test_selection = [{quoted}]
use_git_change_detection = false
timeout_multiplier = {TIMEOUT_MULTIPLIER}
"""


def unmount_leftovers(folder: Path) -> None:
    """Unmount what a killed worker left mounted under ``folder``.

    The full-disk tests (tests/test_store_faults.py) mount a tiny tmpfs as their data folder
    and unmount it when done; a worker killed by a timeout in the middle never does.
    """
    mounts = Path("/proc/self/mounts")
    if not mounts.exists():
        return
    inside = str(folder.resolve()) + os.sep
    points = [line.split()[1] for line in mounts.read_text().splitlines()]
    for point in sorted((p for p in points if p.startswith(inside)), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def prepare(module: str) -> Path:
    """A fresh working folder for one module's run."""
    work = WORK / module
    unmount_leftovers(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    # The project's pytest settings (markers, filterwarnings) plus this module's mutmut table.
    pyproject = (ROOT / "pyproject.toml").read_text()
    (work / "pyproject.toml").write_text(pyproject + mutmut_config(module))
    return work


def run_module(module: str, jobs: int, only: list[str] | None = None) -> float:
    """Run mutmut for one module from scratch, or re-run ``only`` these mutants; return the time.

    A re-run keeps every other result and the module's test selection, and uses the test
    files as they are now (mutmut copies tests/ again and collects any new test).
    """
    work = WORK / module if only else prepare(module)
    started = time.monotonic()
    log = work / ("mutmut-recheck.log" if only else "mutmut.log")
    # pytest keeps each session's tmp_path folder under one root and, at every session's end,
    # looks through that root for old ones to delete. A mutmut worker's session is one mutant,
    # and a worker that is killed (a timeout) leaves its folder locked, so the shared root grew
    # by thousands of folders and every worker spent longer looking through it. Each module's
    # run gets a root of its own, deleted with its working folder.
    temp_root = work / "tmp"
    temp_root.mkdir(exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, str(MUTMUT), "run", "--max-children", str(jobs), *(only or [])],
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTEST_DEBUG_TEMPROOT": str(temp_root)},
        )
    unmount_leftovers(work)
    if done.returncode != 0:
        sys.exit(f"mutmut failed for {module} (exit {done.returncode}); see {log}")
    return time.monotonic() - started


def results(module: str) -> dict[str, str]:
    """Mutant name -> status, from the module's last run."""
    from mutmut.stats import status_by_exit_code

    meta = WORK / module / "mutants" / (MODULES[module][0] + ".meta")
    if not meta.exists():
        sys.exit(f"no results for {module}: run it first")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in codes.items()}


def natural(item: tuple[str, str]) -> tuple[str, int]:
    """Sort mutant names by function, then by number (``_2`` before ``_10``)."""
    stem, _, number = item[0].rpartition("_")
    return stem, int(number) if number.isdigit() else 0


def counted_out(status: str, reason: str | None) -> bool:
    """Whether a listed mutant leaves the score: a survivor, or an import-time one no test reached.

    mutmut reports "no tests" for a function that never ran in its own process (one that runs
    only in a forked child, say); a hand-checked import-time line covers that case too.
    """
    if reason is None:
        return False
    return status == "survived" or (status == "no tests" and reason.startswith(IMPORT_TIME))


def row(module: str, statuses: dict[str, str], equivalents: dict[str, str]) -> list[str]:
    counts = Counter(statuses.values())
    listed = [n for n in statuses if counted_out(statuses[n], equivalents.get(n))]
    import_time = [n for n in listed if equivalents[n].startswith(IMPORT_TIME)]
    detected = counts["killed"] + counts["timeout"]
    missed = len(statuses) - detected - len(listed)
    denominator = len(statuses) - len(listed)
    score = f"{100 * detected / denominator:.0f}%" if denominator else "-"
    return [
        module,
        str(len(statuses)),
        str(counts["killed"]),
        str(missed),
        str(counts["timeout"]),
        str(len(listed) - len(import_time)),
        str(len(import_time)),
        score,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"any of {', '.join(MODULES)}")
    # One worker a core. A third worker on 2 cores made a whole run no quicker (auth 153 s with
    # 2, 159 s with 3), and the store's PostgreSQL tests gave different verdicts under the load.
    workers = os.cpu_count() or 1
    parser.add_argument(
        "--jobs", type=int, default=int(os.environ.get("MUTATION_JOBS", str(workers)))
    )
    parser.add_argument(
        "--report", action="store_true", help="only print the table of the last run's results"
    )
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="re-run only the last run's undetected mutants, against the tests as they are now",
    )
    args = parser.parse_args()
    modules = args.modules or list(MODULES)
    unknown = set(modules) - set(MODULES)
    if unknown:
        parser.error(f"unknown module(s): {', '.join(sorted(unknown))}")
    equivalents = load_equivalents()

    header = [
        "module",
        "mutants",
        "killed",
        "survived",
        "timed out",
        "equivalent",
        "import-time",
        "score",
    ]
    rows, survivors, stale = [], [], []
    started = time.monotonic()
    # A TERM (a timeout, a kill) ends the run like Ctrl-C: the server below is stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as servers:
        if not args.report and any(m.startswith(("store", "transfer")) for m in modules):
            # One PostgreSQL for every pytest run mutmut starts (else each starts its own).
            sys.path.insert(0, str(ROOT))
            from tests.servers import Postgres

            server = servers.enter_context(Postgres())
            server.add_workers(args.jobs)  # one role per worker: a runaway mutant starves no other
            os.environ["SECURE_APP_TEST_POSTGRES"] = str(server)
        for module in modules:
            if args.report:
                elapsed = "-"
            elif args.recheck:
                missed = [n for n, st in results(module).items() if st not in ("killed", "timeout")]
                missed = [n for n in missed if n not in equivalents]
                elapsed = f"{run_module(module, args.jobs, missed):.0f}s" if missed else "-"
            else:
                elapsed = f"{run_module(module, args.jobs):.0f}s"
            statuses = results(module)
            rows.append(row(module, statuses, equivalents) + [elapsed])
            for name, status in sorted(statuses.items(), key=natural):
                if status in ("killed", "timeout"):
                    if name in equivalents:
                        stale.append(name)
                elif not counted_out(status, equivalents.get(name)):
                    survivors.append(f"{name}: {status}")
            print(f"{module}: {rows[-1][-2]} in {elapsed}", file=sys.stderr, flush=True)

        print("| " + " | ".join(header + ["time"]) + " |")
        print("|" + "---|" * (len(header) + 1))
        for cells in rows:
            print("| " + " | ".join(cells) + " |")
        if not args.report:
            print(f"\nTotal wall time {time.monotonic() - started:.0f}s with {args.jobs} jobs.")
        print("survived = survived + no tests + suspicious; timeouts count as detected.")
        print("score = (killed + timed out) / (mutants - equivalent - import-time).")
        if survivors:
            print("\nNot detected (see `cd mutants/<module> && mutmut show NAME`):")
            print("\n".join("  " + s for s in survivors))
        if stale:
            print("\nListed as equivalent but killed (remove from the list):")
            print("\n".join("  " + s for s in stale))


if __name__ == "__main__":
    main()
