"""Bench: what a stage costs when it has nothing to do (a cached no-op `dvc repro` step).

    python -m bench.startup [--repeats 5]

Builds a copy of the demo project, runs `ingest` and `bucket` once, then times, in
alternating rounds, fresh processes of:
- `tuneline ingest` and `tuneline bucket` with nothing to do (all items cached);
- the bare interpreter (`python -c pass`): the floor no command goes under;
- `python -c "import mlflow"`: what every stage paid before a stage with nothing to record
  stopped opening an MLflow run.
Each keeps its median. Goal: a cached no-op stage under 2 s. `-X importtime` of the no-op
ingest names the slowest imports left. Prints a table and a final JSON line; `run()`
returns the same data for bench.run_all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

NAME = "startup"
GOAL_SECONDS = 2.0
REPO = Path(__file__).resolve().parents[1]


def _timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds


def _slowest_imports(cwd: Path, env: dict[str, str], count: int = 5) -> list[tuple[str, float]]:
    """The top-level imports of a no-op `tuneline ingest` with the largest cumulative time."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "tuneline.cli", "ingest"], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
    top = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        if cumulative.isdigit() and not name.startswith(" ") and "." not in name.strip():
            top.append((name.strip(), int(cumulative) / 1e6))
    return sorted(top, key=lambda item: -item[1])[:count]


def run(argv: Sequence[str]) -> dict[str, Any]:
    from rich.console import Console

    from bench._common import goal, print_goals

    parser = argparse.ArgumentParser(prog="python -m bench.startup")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(list(argv))
    console = Console(highlight=False)
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        project = work / "project"
        project.mkdir()
        shutil.copytree(REPO / "data/raw", project / "data/raw")
        for name in ("params.yaml", "prompts.yaml"):
            shutil.copy(REPO / name, project / name)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH"))
                                                            if p),
               "TUNELINE_HOME": os.environ.get("TUNELINE_HOME", str(work / "home")), "DO_NOT_TRACK": "1"}
        stage = [sys.executable, "-m", "tuneline.cli"]
        for name in ("scan", "ingest", "bucket"):  # the cold runs: afterwards every item is cached
            _timed([*stage, name], project, env)
        commands = {
            "no-op ingest": [*stage, "ingest"],
            "no-op bucket": [*stage, "bucket"],
            "python -c pass": [sys.executable, "-c", "pass"],
            "import mlflow": [sys.executable, "-c", "import mlflow"],
        }
        times: dict[str, list[float]] = {label: [] for label in commands}
        for _ in range(args.repeats):
            for label, command in commands.items():
                times[label].append(_timed(command, project, env))
        medians = {label: statistics.median(values) for label, values in times.items()}
        slowest = _slowest_imports(project, env)
        report = json.loads((project / "reports/ingest.json").read_text())  # what the last run did (not a DVC metric)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    floor = medians["python -c pass"]
    goals = [
        goal(NAME, f"cached no-op {label.split()[-1]} (wall)", medians[label],
             f"{medians[label]:.2f} s ({medians[label] / floor:.1f}x bare python)", f"< {GOAL_SECONDS:.0f} s",
             medians[label] < GOAL_SECONDS)
        for label in ("no-op ingest", "no-op bucket")
    ]
    goals.append(goal(NAME, "no-op ingest computed nothing", report["computed"], str(report["computed"]), "0",
                      report["computed"] == 0, kind="check"))
    print_goals(goals, console, f"startup: medians of {args.repeats} fresh processes each")
    console.print("for scale: bare python {:.2f} s, `import mlflow` alone {:.2f} s (paid by every stage before)"
                  .format(floor, medians["import mlflow"]))
    console.print("slowest imports of a no-op ingest: " + ", ".join(f"{name} {s:.2f} s" for name, s in slowest))
    return {"bench": NAME, "goals": goals, "medians_s": {k: round(v, 3) for k, v in medians.items()},
            "slowest_imports_s": dict((name, round(s, 3)) for name, s in slowest)}


if __name__ == "__main__":
    from bench._common import bench_main

    sys.exit(bench_main(run, sys.argv[1:]))
