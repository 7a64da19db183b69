"""Resumable checkpoints: one folder per run (see run_key), written aside and renamed into place, the last K kept, a `latest` pointer.

Layout of one checkpoint folder `step_000050/`:
  trained.safetensors   the trained parameters only (LoRA weights, or the full modules)
  adapter_state.safetensors  tensors a step changes outside the optimizer (a VQ codebook and its EMA
                        statistics: TrainerAdapter.state_tensors); only when the adapter has any
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
from typing import Any, Iterable

from tuneline.core.fsutil import atomic_write_json, atomic_write_text, digest_json

LATEST = "latest"
STATE_FILE = "state.json"
ADAPTER_STATE_FILE = "adapter_state.safetensors"

# Train settings that may differ between a checkpoint and the run resuming it.
SAFE_TO_CHANGE = {"num_steps", "num_epochs", "checkpoint", "log_every", "compile", "compile_scope",
                  "channels_last", "gradient_checkpointing", "attention", "mixed_precision",
                  # Reads the weights with its own generators, in eval mode: training computes the same.
                  "validation"}



def added_later_defaults() -> dict[str, Any]:
    """Train settings added after runs existed (dotted for one inside a section: "loss.structure") -> their
    default (dumped): at the default they are left out of the run key and read as set in older checkpoints,
    so a run started before the setting existed keeps its folder and resumes without a note."""
    from tuneline.models.autoencoder.config import VQConfig
    from tuneline.train.config import (FlowMatchingConfig, LossConfig, MaskedLossConfig, StructureConfig,
                                       ValidationConfig)

    return {"flow_matching": FlowMatchingConfig().model_dump(mode="json"),
            "validation": ValidationConfig().model_dump(mode="json"),
            "loss.structure": StructureConfig().model_dump(mode="json"),
            # issue 29: the loss type and its Huber threshold schedule
            **{f"loss.{key}": getattr(LossConfig(), key) for key in ("type", "huber_c", "huber_schedule")},
            # the LyCORIS adapter types (issue 29): a LoRA run started before them keeps its folder
            "lora.type": "lora", "lora.factor": -1, "lora.decompose_both": False,
            # masked loss (issue 29): off, a run started before it keeps its folder
            "masked_loss": MaskedLossConfig().model_dump(mode="json"),
            # the autoencoder section's (issue 27): a kl run started before them keeps its folder
            "kind": "kl", "vq": VQConfig().model_dump(mode="json")}


def _section(config: dict[str, Any], dotted: str) -> dict[str, Any] | None:
    """The dict that holds the last part of `dotted` ("loss" for "loss.structure", `config` itself for a
    top-level key); None where a section on the way is missing."""
    node: Any = config
    for part in dotted.split(".")[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _copy_to(config: dict[str, Any], dotted: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a copy of `config` whose sections on the way to `dotted` are copies too, that copy's section holding
    `dotted`): the caller's dicts stay as they were. `dotted`'s sections must exist (see _section)."""
    config = dict(config)
    node = config
    for part in dotted.split(".")[:-1]:
        node[part] = dict(node[part])
        node = node[part]
    return config, node


def without_added_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A dumped config with every setting of added_later_defaults() that is at its default left out."""
    for dotted, default in added_later_defaults().items():
        section, leaf = _section(config, dotted), dotted.split(".")[-1]
        if section is not None and leaf in section and section[leaf] == default:
            config, section = _copy_to(config, dotted)
            del section[leaf]
    return config


def with_added_defaults(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """A dumped config of an older checkpoint with the settings added since (those `current` has) at their default."""
    for dotted, default in added_later_defaults().items():
        section, now, leaf = _section(saved, dotted), _section(current, dotted), dotted.split(".")[-1]
        if section is not None and leaf not in section and now is not None and leaf in now:
            saved, section = _copy_to(saved, dotted)
            section[leaf] = default
    return saved


class ResumeRefused(ValueError):
    """The checkpoint cannot continue this configuration."""


class UnsafeCheckpoint(ResumeRefused):
    """A checkpoint file holds something other than tensors and plain values."""


def run_key(train_config: dict[str, Any], model: dict[str, Any], data_digest: str, processes: int,
            batching: dict[str, int]) -> str:
    """Names a run's checkpoint folder: everything a resume must not change.

    An interrupted run started again with the same settings finds its folder and
    resumes (safe settings may differ); other settings or data start a new folder, so
    `dvc repro` / `dvc exp run -S train.lr=...` never continue a different run. `batching`
    (batch size per bucket) belongs here: the saved sampler position indexes a batch list
    built from it.
    """
    fixed = {key: value for key, value in without_added_defaults(train_config).items() if key not in SAFE_TO_CHANGE}
    return digest_json({"train": fixed, "model": model, "data": data_digest, "processes": processes,
                        "batching": batching})[:16]


def load_torch(path: Path) -> Any:
    """torch.load of a checkpoint file with weights_only=True: tensors, numbers, strings and
    containers only. A pickle that would build other objects (and could run code) is refused."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsafeCheckpoint(
            f"refusing {path}: it holds objects other than tensors and plain values, which loading could "
            f"use to run code ({first_line}). tuneline's checkpoints never do: do not resume from a file of "
            "unknown origin.") from None


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


def finish(root: Path, step: int, keep_last: int, keep: Iterable[int] = ()) -> Path:
    """Main process: rename the staging folder into place, point `latest` at it, prune old ones
    (all but the last `keep_last`, and never the steps in `keep`: the best validation loss's)."""
    root = Path(root)
    final = root / checkpoint_name(step)
    staging = staging_dir(root, step)
    # data first, then the rename: a crash leaves no trusted half (FSDP's shards are in subfolders)
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    aside = replaced_dir(root, step)
    if final.exists():  # the same step saved again (e.g. stop signal right after a periodic save)
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)  # a kill from here to the next rename: find_latest() renames it back
    os.rename(staging, final)
    shutil.rmtree(aside, ignore_errors=True)
    atomic_write_text(root / LATEST, final.name + "\n")
    kept = {checkpoint_name(s) for s in keep}
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def replaced_dir(root: Path, step: int) -> Path:
    return Path(root) / f".{checkpoint_name(step)}.replaced"


def _complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def find_latest(root: Path) -> tuple[Path | None, str | None]:
    """The checkpoint to resume from, and a note when `latest` did not point at a complete one.

    A kill while a step was saved again can leave `latest` naming a folder that is aside
    (renamed back here) or gone: then the newest complete `step_*` is used, never step 0
    while complete checkpoints exist.
    """
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None, None
    name = pointer.read_text("utf-8").strip()
    folder = root / name
    if _complete(folder):
        return folder, None
    if name.startswith("step_") and name[5:].isdigit():
        aside = replaced_dir(root, int(name[5:]))
        if not folder.exists() and _complete(aside):
            os.rename(aside, folder)
            return folder, f"{folder} was set aside by an interrupted save; restored it"
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and _complete(p))
    if not complete:
        return None, f"{pointer} names {name}, which is missing or incomplete, and no complete checkpoint is left"
    return complete[-1], f"{pointer} names {name}, which is missing or incomplete: using {complete[-1].name}"


def latest(root: Path) -> Path | None:
    return find_latest(root)[0]


def write_state(folder: Path, state: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / STATE_FILE, state)


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / STATE_FILE).read_text("utf-8"))


def compare_configs(saved: dict[str, Any], current: dict[str, Any],
                    section: str = "train") -> tuple[list[str], list[str]]:
    """(changes that are safe, changes that are not) between two dumped train configs."""
    safe, unsafe = [], []
    saved = with_added_defaults(saved, current)
    for key in sorted(set(saved) | set(current)):
        if key not in saved and key in SAFE_TO_CHANGE:
            continue  # a speed setting added after the checkpoint was written: nothing changed
        if saved.get(key) != current.get(key):
            line = f"{section}.{key}: {saved.get(key)!r} -> {current.get(key)!r}"
            (safe if key in SAFE_TO_CHANGE else unsafe).append(line)
    return safe, unsafe
