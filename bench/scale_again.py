"""Bench: one-image changes and no-ops side by side on projects `bench.scale --keep` left, in turns.

    python -m bench.scale_again WORK/n1000 WORK/n50000 [--rounds 3]

A single +1 run per scale (what `bench.scale` measures) moves by a few seconds with the machine's load;
this takes the median of `--rounds` runs per project, alternating between the projects so that the load
falls on each alike. Each round adds one more generated image (and its sidecar) to each project and runs
`dvc repro latents`; then `--repeats` no-op `dvc repro latents` and `dvc status latents` per project.
The projects keep their own copy of src/ (bench.scale copied it): to measure the current code, copy src/
over them first. Prints a table and, last, one JSON line; exits 1 when a +1 run did not compute exactly one
item in ingest, bucket and latents.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from bench.scale import DATASET, dvc, stage_reports, write_image

NAME = "scale_again"
FIRST_INDEX = 900_000  # above every index bench.scale generates


def next_index(raw: Path) -> int:
    """The first free image index at or above FIRST_INDEX in the data set folder."""
    taken = {int(p.stem.split("_")[-1]) for p in raw.glob("img_*.jpg")}
    index = FIRST_INDEX
    while index in taken:
        index += 1
    return index


def plus_one(root: Path) -> dict[str, Any]:
    raw = root / "data" / "raw" / DATASET
    write_image(raw, next_index(raw))
    run = dvc(root, "repro", "latents")
    reports = stage_reports(root, [s for s in run["ran"] if (root / "reports" / f"{s}.json").is_file()])
    return {"seconds": run["seconds"], "stages": {s: r["seconds"] for s, r in reports.items()},
            "computed": {s: r["computed"] for s, r in reports.items()}}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("projects", nargs="+", type=Path, help="project folders bench.scale --keep left (WORK/n<N>)")
    parser.add_argument("--rounds", type=int, default=3, help="one-image changes per project (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="no-op repros and dvc status runs per project (default 3)")
    args = parser.parse_args(argv)
    projects = [p.resolve() for p in args.projects]
    for root in projects:
        if not (root / "dvc.lock").is_file():
            parser.error(f"{root} is no project bench.scale kept (no dvc.lock): run bench.scale with --keep")
    runs: dict[Path, list[dict[str, Any]]] = {root: [] for root in projects}
    for round_index in range(args.rounds):
        for root in projects:
            runs[root].append(plus_one(root))
            print(f"  {root.name} round {round_index + 1}: +1 image {runs[root][-1]['seconds']:.1f} s", flush=True)
    rows = []
    for root in projects:
        noop = [dvc(root, "repro", "latents")["seconds"] for _ in range(args.repeats)]
        status = [dvc(root, "status", "latents")["seconds"] for _ in range(args.repeats)]
        items = sum(1 for _ in open(root / "data" / "latents" / "manifest.jsonl", encoding="utf-8"))
        stages = sorted({s for r in runs[root] for s in r["stages"]})
        rows.append({
            "project": str(root), "images": items,
            "plus_one_s": [r["seconds"] for r in runs[root]],
            "plus_one_median_s": statistics.median(r["seconds"] for r in runs[root]),
            "stage_median_s": {s: statistics.median(r["stages"].get(s, 0.0) for r in runs[root]) for s in stages},
            "one_item_each": all(all(r["computed"].get(s) == 1 for s in ("ingest", "bucket", "latents"))
                                 for r in runs[root]),
            "noop_s": noop, "noop_median_s": statistics.median(noop),
            "status_s": status, "status_median_s": statistics.median(status)})
    result = {"bench": NAME, "rounds": args.rounds, "projects": rows}
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{NAME}: medians of {args.rounds} one-image changes, {args.repeats} no-ops and dvc status, side by side")
    for column in ("images", "+1 image s", "x the first", "stages' own s", "no-op s", "dvc status s", "1 item each"):
        table.add_column(column, justify="right")
    first = rows[0]["plus_one_median_s"]
    for row in rows:
        own = ", ".join(f"{s} {v:.2f}" for s, v in row["stage_median_s"].items() if v >= 0.01)
        table.add_row(f"{row['images']:,}", f"{row['plus_one_median_s']:.2f}", f"{row['plus_one_median_s'] / first:.2f}x",
                      own, f"{row['noop_median_s']:.2f}", f"{row['status_median_s']:.2f}", str(row["one_item_each"]))
    Console(highlight=False, width=160).print(table)
    print(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    result = run(argv)
    return 0 if all(row["one_item_each"] for row in result["projects"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
