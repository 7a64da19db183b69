"""The stages in pipeline order and how each is run: the one list that the CLI, the Prefect
flow and the dvc.yaml checks read. It imports no stage code: a stage's module is imported
when the stage runs, so `tuneline --help` and `tuneline check` stay instant.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.core import layout


@dataclass(frozen=True)
class Stage:
    """One stage: its name (the same in dvc.yaml, stages/, Prefect and MLflow) and folders."""

    name: str
    reads: tuple[str, ...]  # input folders, relative to the project root, in `run`'s argument order
    writes: str  # output folder
    gpu: bool = False  # wants an accelerator (Prefect's "gpu" concurrency tag)
    shardable: bool = False  # missing items can be computed by several workers (`--shard I/N`)
    tracked: bool = True  # an MLflow run of its own (not for `models`: a check that runs on every repro)
    trains: bool = False  # runs the trainer core: logs its own params, refuses a second writer, resumes
    uses_vae: bool = False  # encodes or decodes: gets the autoencoder stage's VAE when that stage is on

    @property
    def module(self) -> str:
        return f"tuneline.stages.{self.name}.stage"

    def run(self, params: Any, root: Path, tracker: Any = None, **options: Any) -> Any:
        """Call `tuneline.stages.<name>.stage.run` on the project layout; returns its StageReport."""
        root = Path(root)
        if self.uses_vae:
            from tuneline.stages.autoencoder import with_trained_vae

            params = with_trained_vae(params, root)
        run = importlib.import_module(self.module).run
        folders = [root / folder for folder in (*self.reads, self.writes)]
        return run(params, root, *folders, root / layout.METRICS, tracker=tracker, **options)


STAGES: tuple[Stage, ...] = (
    Stage("models", (), layout.MODEL_IDENTITY, tracked=False),
    # Untracked like models: it runs on every `dvc repro` and its work is a walk of the data set folders.
    Stage("scan", (), layout.SCANNED, tracked=False),
    Stage("ingest", (layout.SCANNED,), layout.INGESTED),
    Stage("bucket", (layout.INGESTED,), layout.BUCKETED),
    Stage("autoencoder", (layout.BUCKETED,), layout.AUTOENCODER, gpu=True, trains=True),
    Stage("caption", (layout.BUCKETED,), layout.CAPTIONED, gpu=True, shardable=True),
    Stage("latents", (layout.CAPTIONED,), layout.LATENTS, gpu=True, shardable=True, uses_vae=True),
    Stage("train", (layout.LATENTS,), layout.TRAINED, gpu=True, trains=True, uses_vae=True),
    Stage("render", (layout.TRAINED,), layout.RENDERS, gpu=True, uses_vae=True),
    Stage("export", (layout.TRAINED, layout.RENDERS), layout.EXPORT, uses_vae=True),
)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)


def stage(name: str) -> Stage:
    """The stage called `name`; KeyError naming the known stages otherwise."""
    for entry in STAGES:
        if entry.name == name:
            return entry
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
