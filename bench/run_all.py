"""Run every bench module with its default settings and print one combined table of goals.

    python -m bench.run_all [NAME ...]     (from the project root; `make bench` runs it)

A bench module is any module in bench/ (other than this one) with a `run(argv) -> dict`
whose dict has a "goals" list of {name, display, goal, passed, kind}. A missed goal is a
measurement, not an error: the exit status is 1 only when a correctness check fails or
a bench crashes.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from bench._common import print_goals

BENCH_DIR = Path(__file__).resolve().parent
# Benches whose defaults take hours: `make bench` runs them at the scale given here
# (bench.scale's 10k and 50k images: run `python -m bench.scale` on its own).
RUN_ALL_ARGS = {"scale": ["--scales", "1000"]}


def bench_names() -> list[str]:
    """Every bench module in bench/, sorted; private modules and this runner excluded."""
    return sorted(m.name for m in pkgutil.iter_modules([str(BENCH_DIR)])
                  if m.name != "run_all" and not m.name.startswith("_"))


def run_one(name: str) -> dict[str, Any]:
    """Import bench.<name> and run it with default settings (RUN_ALL_ARGS); a crash becomes a failed check."""
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.{name}")
        if not callable(getattr(module, "run", None)):
            return {"bench": name, "goals": [], "skipped": "no run() function"}
        result = module.run(list(RUN_ALL_ARGS.get(name, [])))
    except Exception as error:  # noqa: BLE001 - one broken bench must not hide the others
        traceback.print_exc()
        result = {"bench": name, "goals": [{"bench": name, "name": "bench ran", "display": type(error).__name__,
                                            "goal": "no error", "passed": False, "kind": "check"}]}
    result.setdefault("seconds", round(time.perf_counter() - started, 1))
    return result


def print_combined(results: Sequence[dict[str, Any]], console: Console) -> None:
    for result in results:
        if result.get("skipped"):
            console.print(f"{result['bench']}: skipped: {result['skipped']}")
    print_goals([g for r in results for g in r["goals"]], console, "all benches: measured vs goal", with_bench=True)


def main(argv: Sequence[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or bench_names()
    unknown = sorted(set(names) - set(bench_names()))
    if unknown:
        print(f"unknown bench(es): {', '.join(unknown)}; available: {', '.join(bench_names())}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = [run_one(name) for name in names]
    console = Console(highlight=False, width=max(120, Console().width))
    console.print()
    print_combined(results, console)
    total = time.perf_counter() - started
    console.print(f"{len(results)} bench(es) in {total:.0f} s")
    summary = {"benches": [{"bench": r["bench"], "seconds": r["seconds"], "goals": r["goals"]} for r in results],
               "total_s": round(total, 1)}
    print(json.dumps(summary, separators=(",", ":")))
    failed = [g for r in results for g in r["goals"] if g.get("kind") == "check" and not g["passed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
