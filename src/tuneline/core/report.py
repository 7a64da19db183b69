"""The end-of-stage summary: counts on screen, metrics/<stage>.json for `dvc metrics`, and
reports/<stage>.json with everything else about the run.

The two files differ in what may go into them. metrics/<stage>.json is a DVC output: it holds
the few numbers people compare between experiments (`metrics=` of the StageReport), each one
decided by the stage's inputs alone, so the same inputs give the same bytes whether DVC or the
Prefect flow ran the stage, and whether it computed its items or took them all from the store.
reports/<stage>.json is not tracked by DVC: the work of this one run (computed, reused, seconds,
models loaded, ...), which differs between a run and a rerun of the same inputs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tuneline.core.fsutil import atomic_write_json
from tuneline.core.layout import REPORTS

console = Console(highlight=False)

COUNTS = ("items", "rejected")


def print_error(title: str, message: str) -> None:
    """An error for a person: no rich markup (keys like `datasets[a]` must survive), no wrapping."""
    console.print(f"[red]{title}[/]")
    console.print(message, markup=False, soft_wrap=True)


def print_warning(message: str) -> None:
    console.print("[yellow]warning:[/] ", end="")
    console.print(message, markup=False, soft_wrap=True)


@dataclass
class StageReport:
    """Counts of one stage run. `computed + reused` items were produced; `rejected` were not.

    `metric_keys` names the entries of `as_report()` that go to metrics/<stage>.json: only numbers
    that the stage's inputs decide (never computed/reused, seconds, or anything about this run).
    """

    stage: str
    metric_keys: tuple[str, ...] = COUNTS
    computed: int = 0
    reused: int = 0
    given: int = 0  # produced without work or store (a sidecar caption is taken as given)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    tables: list[Any] = field(default_factory=list)  # rich renderables shown under the summary
    seconds: float = 0.0

    @property
    def produced(self) -> int:
        return self.computed + self.reused + self.given

    def reject(self, source: str, reason: str, **details: Any) -> None:
        self.rejected.append({"stage": self.stage, "source": source, "reason": reason, **details})

    def rejection_counts(self) -> Counter[str]:
        """Rejections grouped by the kind of reason (the text before the first ':')."""
        return Counter(item["reason"].split(":")[0] for item in self.rejected)

    def as_report(self) -> dict[str, Any]:
        """Everything about this run: the counts, the stage's own entries, seconds and warnings."""
        return {
            "stage": self.stage,
            "items": self.produced,
            "computed": self.computed,
            "reused": self.reused,
            **({"given": self.given} if self.given else {}),
            "rejected": len(self.rejected),
            **({"rejected_by_reason": dict(sorted(self.rejection_counts().items()))} if self.rejected else {}),
            **self.extra,
            "seconds": round(self.seconds, 3),
            "warnings": list(self.warnings),
        }

    def metrics(self) -> dict[str, Any]:
        """What metrics/<stage>.json holds: the `metric_keys` entries of `as_report()`."""
        full = self.as_report()
        return {key: full[key] for key in self.metric_keys if key in full}

    def numbers(self) -> dict[str, float]:
        """The report's numeric entries (for MLflow)."""
        return {key: value for key, value in self.as_report().items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)}

    def write_metrics(self, metrics_dir: Path) -> Path:
        """metrics/<stage>.json (tracked by DVC), and reports/<stage>.json beside the metrics folder."""
        path = Path(metrics_dir) / f"{self.stage}.json"
        atomic_write_json(path, self.metrics())
        atomic_write_json(report_path(Path(metrics_dir).parent, self.stage), self.as_report())
        return path

    def print_summary(self, rejected_file: Path | None = None) -> None:
        """The stage's table (title on its own line: a narrow table would wrap it), then its warnings."""
        console.print(Text(self.title(), style="bold"), soft_wrap=True)
        table = Table(show_header=False)
        for label, value in self.rows():
            table.add_row(label, value)
        console.print(table)
        for extra_table in self.tables:
            console.print(extra_table)
        for warning in self.warnings[:20]:
            print_warning(warning)
        if len(self.warnings) > 20:
            console.print(f"[yellow]... and {len(self.warnings) - 20} more warnings[/]")
        if self.rejected and rejected_file is not None:
            console.print(f"rejected items and reasons: {rejected_file}", markup=False, soft_wrap=True)

    def title(self) -> str:
        unit = "step" if self.stage in STEP_STAGES else "item"
        return f"{self.stage}: {plural(self.produced, unit)} in {self.seconds:.1f} s"

    def rows(self) -> list[tuple[str, str]]:
        """The summary table's rows (labels for people; reports/<stage>.json keeps the keys)."""
        done, before = COUNT_LABELS.get(self.stage, COUNT_LABELS[None])
        rows = [(done, str(self.computed)), (before, str(self.reused))]
        parts = [key for key in GIVEN_PARTS if key in self.extra]
        if self.given and not parts:  # broken down by source below otherwise: one row each, no total
            rows.append(("taken as given", str(self.given)))
        rows.append(("rejected", str(len(self.rejected))))
        rows += [(f"  {reason}", str(count)) for reason, count in sorted(self.rejection_counts().items())]
        for key, value in self.extra.items():
            if isinstance(value, (dict, list)) or key in SAID_BY_A_WARNING:
                continue
            if key in GIVEN_PARTS and not value:
                continue
            rows.append((key.replace("_", " "), _shown(key, value)))
        return rows


# The stages that count training steps: computed / reused are the steps of this run / of earlier runs.
STEP_STAGES = ("train", "autoencoder")
COUNT_LABELS: dict[str | None, tuple[str, str]] = {
    None: ("computed", "reused from store"),
    **{stage: ("steps trained", "steps done before (resumed)") for stage in STEP_STAGES},
}
# Where a stage breaks its `given` items down by source (caption: sidecar, default, hand edit), the
# summary shows the non-zero sources instead of the total, so no two rows say the same number.
GIVEN_PARTS = ("from_sidecar", "defaulted", "hand_edited")
# Report entries the summary's warnings already say (a tiny RANDOM-weight model).
SAID_BY_A_WARNING = ("random_tiny_model",)
# 0/1 report entries (numbers for `dvc metrics`) that mean no/yes.
FLAGS = ("enabled",)


def _shown(key: str, value: Any) -> str:
    if isinstance(value, bool) or (key in FLAGS and value in (0, 1)):
        return "yes" if value else "no"
    return "none" if value is None else str(value)


def plural(count: int, noun: str) -> str:
    """'1 item', '2 items', '0 items'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def report_path(root: Path, stage: str) -> Path:
    """<root>/reports/<stage>.json: the last run's report of `stage` (not tracked by DVC)."""
    return Path(root) / REPORTS / f"{stage}.json"
