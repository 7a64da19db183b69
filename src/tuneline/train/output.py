"""The trained output (models/train): what the train stage writes, and how render and export read it.

    models/train/
      trainer_state.json                   the run: step, seed, data digest, train config, family, ...
      pytorch_lora_weights.safetensors     the LoRA parts, as diffusers' save_lora_weights names them
      pipeline/                            the fully trained parts: a whole diffusers pipeline folder
      ema/                                 the EMA weights in the same layout, when kept apart
      best/                                the weights of the lowest validation loss, same layout
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
BEST_DIR = "best"
LIVE_DIR = "live"


def read_trainer_state(trained_dir: Path) -> dict[str, Any]:
    """trainer_state.json of `trained_dir`; {} when there is none (weights written by other means)."""
    path = Path(trained_dir) / TRAINER_STATE
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def choose_weights(trained_dir: Path, use_ema: bool, notes: list[str] | None = None, weights: str = "final",
                   key: str = "weights") -> Path:
    """Where the weights to use are: `trained_dir`, or its ema/ when `use_ema` asks and it is there; with
    `weights` "best", its best/ (the lowest validation loss's weights; `use_ema` does not apply).

    `notes` receives why the choice may differ from what was asked: with train.ema.enabled and no
    ema/ folder the trainer's result already holds the EMA weights (there are no raw ones). `key` names
    the setting that asked for `weights` in the error when there are no best weights."""
    trained_dir = Path(trained_dir)
    if weights == "best":
        best = trained_dir / BEST_DIR
        if not best.is_dir():
            from tuneline.core.params import ParamsError

            raise ParamsError(
                f"{key}: 'best' needs the weights of the lowest validation loss, and {trained_dir} has none "
                f"({best} is missing): the run computed no validation loss. Set train.validation.every_steps > 0 with "
                f"held-out items (datasets[].validation) and train again, or set {key}: final (allowed: final, best)")
        if use_ema and notes is not None:
            notes.append(f"{key}: best uses the trained weights of the best validation step (the EMA is not kept "
                         "per step)")
        return best
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


def exported_step(state: dict[str, Any], weights: str) -> tuple[int, str]:
    """(the step whose weights `weights` ("final" or "best") are, why those): from trainer_state.json."""
    steps = state.get("step", 0)
    if weights == "best":
        step, loss = state.get("best_validation_step", 0), state.get("best_validation_loss")
        return step, f"best validation loss {loss:.6g} at step {step} of {steps}"
    return steps, f"final weights at step {steps} of {steps}"


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
