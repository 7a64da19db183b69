"""Stage `models`: write models/identity/models.json (see the package docstring)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tuneline.config import Params
from tuneline.core.fsutil import atomic_write_json, rebuilt_dir
from tuneline.core.report import StageReport
from tuneline.models.ref import identify
from tuneline.models.training_adapter import identity_entry

STAGE = "models"
IDENTITY_FILE = "models.json"


def read_identity(identity_dir: Path) -> dict[str, dict[str, Any]]:
    import json

    return json.loads((Path(identity_dir) / IDENTITY_FILE).read_text("utf-8"))


def run(params: Params, root: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None) -> StageReport:
    """Identify every model reference of `params`; rewrite `out_dir` only when an identity changed."""
    started = time.perf_counter()
    report = StageReport(STAGE, metric_keys=("items",))
    identities = identify(params, Path(root)) | identity_entry(params.model, Path(root))  # + model.training_adapter
    out_dir = Path(out_dir)
    try:
        previous: dict[str, dict[str, Any]] | None = read_identity(out_dir)
    except (OSError, ValueError):
        previous = None  # the first run (or an unreadable record): identified, nothing "changed"
    unchanged = previous == identities
    if not unchanged:
        with rebuilt_dir(out_dir) as staging:
            atomic_write_json(staging / IDENTITY_FILE, identities)
    # Identified every time (cheap); "computed" counts the identities that changed.
    report.computed, report.reused = (0, len(identities)) if unchanged else (len(identities), 0)
    for key, entry in identities.items():
        if entry["kind"] == "hub" and not entry["revision"]:
            report.warnings.append(f"{key}: hub id {entry['ref']!r} without a pinned revision: a change upstream is "
                                   "not seen; set the revision to a commit hash")
    # No "changed" flag in the metrics: a tracked output must not differ when its inputs do not.
    report.extra.update({key: entry["kind"] for key, entry in identities.items()})
    if previous is not None and not unchanged:
        changed = sorted(key for key in previous.keys() | identities.keys() if previous.get(key) != identities.get(key))
        report.warnings.append(f"model identity changed ({', '.join(changed)}): stages that use "
                               f"{'it' if len(changed) == 1 else 'them'} will rerun")
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
    return report
