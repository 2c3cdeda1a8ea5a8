"""``mutmut`` with one fix: its timeouts signal only the worker they were set for.

mutmut 3.8 keeps a (deadline, pid) for every worker it forks and, when the deadline passes,
sends SIGXCPU to that pid, even if the worker ended long before (it leaves such entries in
its heap on purpose). A mutation run forks thousands of processes, so the machine's pids wrap
around within minutes, and by then the pid may be another worker (a false "timeout", which
counts as detected) or any process on the machine: one such signal ended a ``make test`` run
here. A pid together with its start time (``/proc/<pid>/stat``) names one process; this
launcher signals only when both still match. Used by scripts/mutation.py:
``python scripts/mutmut_run.py run ...`` takes mutmut's own arguments.
"""

from __future__ import annotations

import heapq
import os
import signal
import threading
import time

from mutmut.__main__ import cli
from mutmut.workers import isolation

_deadlines: list[tuple[float, int, str | None]] = []
_changed = threading.Condition()
_started = False


def birth(pid: int) -> str | None:
    """When the process ``pid`` started (clock ticks since boot), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The fields after the command (which may hold spaces) end at the last ")".
            return stat.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def register_timeout(pid: int, timeout_s: float) -> None:
    """Send ``pid`` SIGXCPU in ``timeout_s`` seconds, if it is still the same process."""
    global _started
    with _changed:
        if not _started:
            _started = True
            threading.Thread(target=_check, name="mutmut-timeouts", daemon=True).start()
        heapq.heappush(_deadlines, (time.time() + timeout_s, pid, birth(pid)))
        _changed.notify()


def _check() -> None:
    with _changed:
        while True:
            while not _deadlines:
                _changed.wait()
            now = time.time()
            while _deadlines and _deadlines[0][0] <= now:
                _, pid, born = heapq.heappop(_deadlines)
                if born is not None and birth(pid) == born:
                    try:
                        os.kill(pid, signal.SIGXCPU)
                    except ProcessLookupError:
                        pass
            if _deadlines:
                _changed.wait(timeout=max(0.0, _deadlines[0][0] - now))


isolation.register_timeout = register_timeout

if __name__ == "__main__":
    cli()
