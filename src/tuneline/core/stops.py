"""A stage stopped on request (SIGTERM, Ctrl-C, a cancel from the Prefect UI) and its driver.

The driver (the Prefect flow) sets two variables for the stage process:
- TUNELINE_RESUME_COMMAND: the exact command that resumes the driver's run, overrides
  included; the trainer's stop message names it instead of the generic advice.
- TUNELINE_STOP_RECORD: a file where the stopped stage records its message and the
  checkpoint it saved, which the driver then puts in its log and final state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tuneline.core.fsutil import atomic_write_json

RESUME_COMMAND_ENV = "TUNELINE_RESUME_COMMAND"
STOP_RECORD_ENV = "TUNELINE_STOP_RECORD"
GENERIC_RESUME = "the same command again (or `dvc repro`)"


def resume_command() -> str:
    """How to resume, for a stop message: the driver's command, else the generic advice."""
    return os.environ.get(RESUME_COMMAND_ENV) or GENERIC_RESUME


def write_stop_record(stage: str, message: str, checkpoint: Path | None) -> None:
    """Record a stop for the driver, when it asked for one (TUNELINE_STOP_RECORD)."""
    path = os.environ.get(STOP_RECORD_ENV)
    if path:
        atomic_write_json(Path(path), {"stage": stage, "message": message,
                                       "checkpoint": str(checkpoint) if checkpoint else None})


def read_stop_record(path: Path) -> dict[str, Any]:
    """What the stopped stage recorded; empty when it recorded nothing (a data stage killed by
    the signal's default action, or a stop before anything was saved)."""
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
