"""What a training run's sessions share outside DVC's outputs, beside its checkpoints: its one
MLflow run (`mlflow_run.json`: every session of the run logs to it, so the curve runs from step 1
to the end) and the run record (`run.json`: sessions, wall-clock times). Used by every stage
that trains on the trainer core (train, autoencoder)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tuneline.core import layout
from tuneline.core.fsutil import atomic_write_json

RUN_RECORD = layout.TRAIN_RUN_RECORD

MLFLOW_RUN_FILE = "mlflow_run.json"


def recorded_mlflow_run(checkpoint_dir: Path) -> str | None:
    """The MLflow run of this training run (one per run key, kept beside its checkpoints)."""
    path = Path(checkpoint_dir) / MLFLOW_RUN_FILE
    try:
        return json.loads(path.read_text("utf-8")).get("run_id") or None
    except (OSError, ValueError, AttributeError):
        return None


def track_training_run(trainer: Any, tracker: Any) -> str | None:
    """One MLflow run per training run: a session that will train continues the run recorded
    beside the checkpoints (resumed, or SIGKILLed and left RUNNING), or starts it and records it.
    Runs of this project's other training runs still marked RUNNING died (only one train runs
    per project, see the CLI's stage lock): they are marked KILLED. Returns the run id."""
    recorded = recorded_mlflow_run(trainer.checkpoint_dir)
    if tracker is None or not tracker.active or trainer.state.step >= trainer.total_steps:
        return recorded  # nothing to train: no run is opened
    tracker.continue_run(recorded)
    tracker.begin()
    if tracker.run_id != recorded:
        atomic_write_json(trainer.checkpoint_dir / MLFLOW_RUN_FILE, {"run_id": tracker.run_id})
    others = [recorded_mlflow_run(folder) for folder in trainer.checkpoint_root.iterdir()
              if folder.is_dir() and folder != trainer.checkpoint_dir]
    tracker.end_orphans([run_id for run_id in others if run_id])
    return tracker.run_id


def write_run_record(trainer: Any, mlflow_run_id: str | None) -> Path:
    """<run checkpoint folder>/run.json: what only the sessions know, kept out of DVC's outputs."""
    path = trainer.checkpoint_dir / RUN_RECORD
    atomic_write_json(path, {
        "run_key": trainer.run_key,
        # Every (re)start that saved a checkpoint: its first step and wall-clock start.
        "sessions": trainer.state.history,
        # The training run's one MLflow run (all its sessions log to it): the run export names.
        "mlflow_run_id": mlflow_run_id,
        "started_at": trainer.state.history[0]["time"],
        "trained_at": time.time(),
        "steps": trainer.state.step})
    return path
