"""The trained output (models/train): what the train stage writes, and how render and export read it.

    models/train/
      trainer_state.json                   the run: step, seed, data digest, train config, family, ...
      pytorch_lora_weights.safetensors     the LoRA parts, as diffusers' save_lora_weights names them
      pipeline/                            the fully trained parts: a whole diffusers pipeline folder
      ema/                                 the EMA weights in the same layout, when kept apart
      live/                                samples rendered during training

Every reader takes the names, the trainer state, the choice of EMA or raw weights and the trained
family from here, so they are decided once. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneline.models.base import Family
    from tuneline.models.config import ModelConfig

TRAINER_STATE = "trainer_state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, which save_lora_weights writes
PIPELINE_DIR = "pipeline"
EMA_DIR = "ema"
LIVE_DIR = "live"


def read_trainer_state(trained_dir: Path) -> dict[str, Any]:
    """trainer_state.json of `trained_dir`; {} when there is none (weights written by other means)."""
    path = Path(trained_dir) / TRAINER_STATE
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def choose_weights(trained_dir: Path, use_ema: bool, notes: list[str] | None = None) -> Path:
    """Where the weights to use are: `trained_dir`, or its ema/ when `use_ema` asks and it is there.

    `notes` receives why the choice may differ from what was asked: with train.ema.enabled and no
    ema/ folder the trainer's result already holds the EMA weights (there are no raw ones)."""
    trained_dir = Path(trained_dir)
    separate = trained_dir / EMA_DIR
    if use_ema and separate.is_dir():
        return separate
    if notes is not None:
        ema_enabled = bool(read_trainer_state(trained_dir).get("train_config", {}).get("ema", {}).get("enabled"))
        if use_ema and not ema_enabled:
            notes.append("render.use_ema is on but the run kept no EMA weights (train.ema.enabled was off): "
                         "rendering the trained weights")
        elif not use_ema and ema_enabled and not separate.is_dir():
            notes.append("train.ema.enabled was on: the trainer's result holds the EMA weights, so those are "
                         "rendered (render.use_ema: false has no raw weights to choose)")
    return trained_dir


def trained_family(state: dict[str, Any], model: ModelConfig, root: Path | None = None) -> Family:
    """The family that was trained: the trainer state's `family` (read_trainer_state), else `model`'s
    (detect_family; a trainer_state.json without `family` predates the second family)."""
    from tuneline.models.family import family_of, get_family

    name = state.get("family")
    return get_family(name) if name else family_of(model, root)


def weights_identity(weights_dir: Path, root: Path | None = None) -> str:
    """Digest of the trained weights in `weights_dir` (its LoRA file and full pipeline folder): names
    exactly what a sample was rendered from and what export ships (file digests are cached by stat)."""
    from tuneline.core.fsutil import digest_json
    from tuneline.models.ref import model_identity

    weights_dir = Path(weights_dir)
    return digest_json({name: model_identity(str(weights_dir / name), root=root)
                        for name in (LORA_FILE, PIPELINE_DIR) if (weights_dir / name).exists()})
