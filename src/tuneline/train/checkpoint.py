"""Resumable checkpoints: one folder per run (see run_key), written aside and renamed into place, the last K kept, a `latest` pointer.

Layout of one checkpoint folder `step_000050/`:
  trained.safetensors   the trained parameters only (LoRA weights, or the full modules)
  training.pt           optimizer, LR scheduler, grad scaler and EMA states
  rng_rank<r>.pt        every RNG stream of process r
  state.json            TrainState, the train config and the data digest it was made with

A folder only gets its final name when complete, so `latest` never points at a partial one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tuneline.core.fsutil import atomic_write_json, atomic_write_text, digest_json

LATEST = "latest"
STATE_FILE = "state.json"

# Train settings that may differ between a checkpoint and the run resuming it.
SAFE_TO_CHANGE = {"num_steps", "num_epochs", "checkpoint", "log_every", "compile", "gradient_checkpointing",
                  "attention", "mixed_precision"}


class ResumeRefused(ValueError):
    """The checkpoint cannot continue this configuration."""


def run_key(train_config: dict[str, Any], model: dict[str, Any], data_digest: str, processes: int) -> str:
    """Names a run's checkpoint folder: everything a resume must not change.

    An interrupted run started again with the same settings finds its folder and
    resumes (safe settings may differ); other settings or data start a new folder, so
    `dvc repro` / `dvc exp run -S train.lr=...` never continue a different run.
    """
    fixed = {key: value for key, value in train_config.items() if key not in SAFE_TO_CHANGE}
    return digest_json({"train": fixed, "model": model, "data": data_digest, "processes": processes})[:16]


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def staging_dir(root: Path, step: int) -> Path:
    return Path(root) / f".{checkpoint_name(step)}.tmp"


def begin(root: Path, step: int) -> Path:
    """Main process: a fresh staging folder every process writes its part into."""
    staging = staging_dir(root, step)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def finish(root: Path, step: int, keep_last: int) -> Path:
    """Main process: rename the staging folder into place, point `latest` at it, prune old ones."""
    root = Path(root)
    final = root / checkpoint_name(step)
    staging = staging_dir(root, step)
    for path in staging.iterdir():  # data first, then the rename: a crash leaves no trusted half
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # the same step saved again (e.g. stop signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(staging, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    folder = Path(root) / pointer.read_text("utf-8").strip()
    return folder if (folder / STATE_FILE).is_file() else None


def write_state(folder: Path, state: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / STATE_FILE, state)


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / STATE_FILE).read_text("utf-8"))


def compare_configs(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that are safe, changes that are not) between two dumped train configs."""
    safe, unsafe = [], []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            line = f"train.{key}: {saved.get(key)!r} -> {current.get(key)!r}"
            (safe if key in SAFE_TO_CHANGE else unsafe).append(line)
    return safe, unsafe
