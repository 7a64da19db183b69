"""`tuneline exp`: DVC experiments in one table that fits a terminal.

`dvc exp show` has a column per param and metric (about 2,600 characters wide on the demo). This
reads the same data (`dvc exp show --json`) and shows one row per experiment: its name, train.lr,
the steps trained, the final loss, the best validation loss, and the params that differ from the
commit the experiment was run on.

    tuneline exp                 # the experiments of HEAD, and the workspace
    tuneline exp -A --sort loss  # of every commit, lowest loss first
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

PARAMS_FILE = "params.yaml"
TRAIN_METRICS = "metrics/train.json"
SORTS = ("time", "loss", "val_loss")


@dataclass(frozen=True)
class Experiment:
    """One row: an experiment, a baseline commit, or the workspace."""

    name: str
    kind: str  # "workspace" | "baseline" | "experiment"
    lr: float | None
    steps: int | None
    loss: float | None
    val_loss: float | None
    diff: tuple[str, ...]  # "train.lr=0.001": params that differ from the baseline
    timestamp: str | None
    error: str | None = None


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists stay whole (a data set list is one value)."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _params(data: dict[str, Any]) -> dict[str, Any]:
    return _flat(((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {})


def _train_metrics(data: dict[str, Any]) -> dict[str, Any]:
    return ((data.get("metrics") or {}).get(TRAIN_METRICS) or {}).get("data") or {}


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else (
        "null" if value is None else str(value))
    return text if len(text) <= 24 else text[:23] + "…"


def params_diff(params: dict[str, Any], baseline: dict[str, Any]) -> tuple[str, ...]:
    """`key=value` for each param of `params` that differs from `baseline` (a removed one: `key=(unset)`)."""
    changed = [f"{key}={_short(params[key])}" for key in params if key not in baseline or params[key] != baseline[key]]
    changed += [f"{key}=(unset)" for key in baseline if key not in params]
    return tuple(changed)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _row(entry: dict[str, Any], kind: str, name: str, baseline: dict[str, Any]) -> Experiment:
    data = entry.get("data") or {}
    params, metrics = _params(data), _train_metrics(data)
    error = entry.get("error")
    steps = _number(metrics.get("steps"))
    if steps is None:
        steps = _number(params.get("train.num_steps"))
    return Experiment(
        name=name, kind=kind, lr=_number(params.get("train.lr")), steps=None if steps is None else int(steps),
        loss=_number(metrics.get("loss")), val_loss=_number(metrics.get("val_loss_best")),
        diff=params_diff(params, baseline) if kind != "baseline" and params else (), timestamp=data.get("timestamp"),
        error=(error.get("msg") or error.get("type") or "failed") if isinstance(error, dict) else None)


def experiments(document: list[dict[str, Any]]) -> Iterator[Experiment]:
    """The rows of a `dvc exp show --json` document: the workspace (compared with the first commit),
    then each commit followed by its experiments (each compared with that commit)."""
    commits = [entry for entry in document if entry.get("rev") != "workspace"]
    head = _params(commits[0].get("data") or {}) if commits else {}
    for entry in document:
        if entry.get("rev") == "workspace":
            yield _row(entry, "workspace", "workspace", head)
            continue
        baseline = _params(entry.get("data") or {})
        yield _row(entry, "baseline", entry.get("name") or str(entry.get("rev", ""))[:7], baseline)
        for experiment in entry.get("experiments") or []:
            revs = experiment.get("revs") or []
            if not revs:
                continue
            tip = revs[0]  # the experiment's last commit
            name = experiment.get("name") or tip.get("name") or str(tip.get("rev", ""))[:7]
            yield _row(tip, "experiment", name, baseline)


def sorted_rows(rows: list[Experiment], sort: str) -> list[Experiment]:
    """`time`: as DVC lists them; `loss` / `val_loss`: lowest first, rows without one last."""
    if sort == "time":
        return rows
    key = (lambda row: row.loss) if sort == "loss" else (lambda row: row.val_loss)
    return sorted(rows, key=lambda row: (key(row) is None, key(row) or 0.0))


def _number_text(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


NAME_WIDTH = 28


def _cells(row: Experiment) -> list[str]:
    name = f"{row.name} (baseline)" if row.kind == "baseline" else row.name
    diff = f"failed: {row.error}" if row.error else ", ".join(row.diff) or "-"
    return [name, _number_text(row.lr, ".3g"), "-" if row.steps is None else str(row.steps),
            _number_text(row.loss, ".4f"), _number_text(row.val_loss, ".4f"), diff]


def experiments_table(rows: list[Experiment], width: int):
    """A rich table of one line per row, at most `width` characters wide: a long name or diff ends in "…"."""
    from rich.table import Table

    headers = ("experiment", "lr", "steps", "loss", "val loss", "diff")
    cells = [_cells(row) for row in rows]
    widths = [max([len(header), *(len(line[index]) for line in cells)]) for index, header in enumerate(headers)]
    widths[0] = min(widths[0], NAME_WIDTH)
    # Each column has a space either side and a rule after it, plus the table's first rule.
    room = width - sum(widths[:-1]) - 3 * len(headers) - 1
    table = Table(title=f"{sum(1 for row in rows if row.kind == 'experiment')} experiments "
                        "(diff: params.yaml values that differ from the commit they ran on)",
                  title_justify="left", header_style="bold")
    for index, header in enumerate(headers):
        numeric = 0 < index < len(headers) - 1
        table.add_column(header, justify="right" if numeric else "left", no_wrap=True, overflow="ellipsis",
                         width=widths[index] if index < len(headers) - 1 else max(8, min(widths[-1], room)))
    for row, line in zip(rows, cells):
        table.add_row(*line, style="bold" if row.kind != "experiment" else None)
    return table


def show(root: Path, dvc_args: list[str], sort: str = "time") -> int:
    """Run `dvc exp show --json` in `root` and print the table; the exit status (dvc's on its failure)."""
    from tuneline.core.report import console, print_error

    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json", *dvc_args], cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        print_error("dvc exp show failed", (done.stderr or done.stdout).strip())
        return done.returncode
    try:
        document = json.loads(done.stdout)
    except json.JSONDecodeError as error:
        print_error("dvc exp show failed", f"its --json output is not JSON ({error}): {done.stdout[:200]!r}")
        return 1
    console.print(experiments_table(sorted_rows(list(experiments(document)), sort), console.width))
    return 0
