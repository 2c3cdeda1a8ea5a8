"""Does trying a function's known killers first make ``make mutation`` quicker, and change nothing?

Runs ``scripts/mutation.py`` on each module twice, from scratch, one order after the other in
the same run: each mutant's tests quickest first (``MUTATION_TEST_ORDER=duration``), then the
tests that killed other mutants of the same function first (the default, tests/conftest.py).
Prints the wall time of each, their ratio, and whether every mutant got the same verdict: the
order may change only how soon a mutant is killed, never whether it is.

    .venv/bin/python bench/mutation_order.py [MODULE ...]    (default: reauth account)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import mutation  # noqa: E402

ORDERS = {"quickest first": "duration", "known killers first": "killers"}


def run(module: str, order: str) -> tuple[float, dict[str, str]]:
    os.environ["MUTATION_TEST_ORDER"] = order
    try:
        elapsed = mutation.run_module(module, jobs=2)
    finally:
        del os.environ["MUTATION_TEST_ORDER"]
    return elapsed, mutation.results(module)


def main() -> None:
    modules = sys.argv[1:] or ["reauth", "account"]
    rows = []
    for module in modules:
        (slow, before), (fast, after) = (run(module, order) for order in ORDERS.values())
        same = "yes" if before == after else f"no: {sum(before[k] != after.get(k) for k in before)}"
        rows.append((module, len(after), f"{slow:.0f}", f"{fast:.0f}", f"{fast / slow:.2f}x", same))
    print("| module | mutants | " + " s | ".join(ORDERS) + " s | ratio | same verdicts |")
    print("|---|---|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
