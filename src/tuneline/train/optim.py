"""Build the optimizer named by `train.optimizer` over the trainer's parameter groups.

Every optimizer here keeps all of its state in `state_dict()` (tensors, numbers,
tuples), so a checkpoint written with `torch.save` and read back with the default
`torch.load(weights_only=True)` resumes bit-exactly.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from tuneline.train.config import OptimizerConfig

log = logging.getLogger(__name__)

# Which importable module each optimizer needs, and how to get it.
_REQUIREMENTS: dict[str, tuple[str, str]] = {
    "adamw": ("torch", "torch"),
    "adamw8bit": ("bitsandbytes", "pip install bitsandbytes==0.50.2 (a tuneline dependency)"),
    "lion": ("lion_pytorch", "pip install lion-pytorch==0.2.5"),
    "adafactor": ("transformers", "pip install transformers==5.23.0"),
    "prodigy": ("prodigyopt", "pip install prodigyopt==1.1.2"),
}

# Prodigy estimates the step size itself; lr is a multiplier on that estimate.
_PRODIGY_LR_TOLERANCE = 0.1


class OptimizerUnavailable(ValueError):
    """The configured optimizer cannot run here (missing package or no CUDA GPU)."""


def check_optimizer_available(config: OptimizerConfig, device_type: str) -> None:
    """Raise `OptimizerUnavailable` unless `config.name` can run on `device_type`.

    The trainer calls this at start-up, before loading any model, so a bad choice
    fails in seconds with a message that says what to install or choose instead.
    `device_type` is a torch device type: "cuda", "cpu", "mps", ...
    """
    module, install = _REQUIREMENTS[config.name]
    if importlib.util.find_spec(module) is None:
        raise OptimizerUnavailable(
            f"train.optimizer.name={config.name} needs the package '{module}', which is not installed: {install}"
        )
    if config.name == "adamw8bit" and device_type != "cuda":
        raise OptimizerUnavailable(
            f"train.optimizer.name=adamw8bit needs a CUDA GPU (bitsandbytes 8-bit kernels), but training runs on "
            f"'{device_type}'; use train.optimizer.name=adamw here (allowed: adamw, adamw8bit, lion, adafactor, prodigy)"
        )


def build_optimizer(config: OptimizerConfig, param_groups: list[dict[str, Any]],
                    device_type: str = "cpu") -> torch.optim.Optimizer:
    """Build the optimizer `config.name` over `param_groups`.

    Each group is a dict with "params", "lr" and "name" (e.g. "unet",
    "text_encoder_1"); extra keys such as "name" stay in `optimizer.param_groups`,
    so the trainer can log the learning rate per group. The learning rates are the
    base rates: the schedule (tuneline.train.schedule) scales them per step.

    - adamw: torch.optim.AdamW; fused (one kernel for every tensor) when `device_type` is "cuda",
      where the parameters are at the first step, else torch's default (a per-tensor loop on the CPU).
    - adamw8bit: bitsandbytes.optim.AdamW8bit; needs bitsandbytes and CUDA.
    - lion: lion_pytorch.Lion (betas, weight_decay; eps is not used).
    - adafactor: transformers' Adafactor with relative_step, scale_parameter and
      warmup_init off, so the external schedule drives the step size; betas and
      eps of the config are not used (Adafactor keeps no first moment by default).
    - prodigy: prodigyopt.Prodigy; expects lr ~1.0 (logs a warning otherwise) and
      one lr for all groups (raises ValueError otherwise, as Prodigy would at step 1).
    """
    if not param_groups:
        raise ValueError("build_optimizer got no parameter groups: nothing is trained")
    for index, group in enumerate(param_groups):
        missing = [key for key in ("params", "lr", "name") if key not in group]
        if missing:
            raise ValueError(f"param group {index} lacks {missing}; each group needs 'params', 'lr' and 'name'")
    groups = [dict(group) for group in param_groups]
    # The constructors want a default lr; every group carries its own, so this one is never used.
    default_lr = max(group["lr"] for group in groups)
    betas = tuple(config.betas)

    if config.name == "adamw":
        fused = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=default_lr, betas=betas, eps=config.eps, weight_decay=config.weight_decay,
                                 **fused)

    if config.name == "adamw8bit":
        # build_optimizer does not know the training device (accelerate moves the
        # model later), so only CUDA's presence is checked here.
        check_optimizer_available(config, "cuda" if torch.cuda.is_available() else "cpu")
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(
            groups, lr=default_lr, betas=betas, eps=config.eps, weight_decay=config.weight_decay
        )

    if config.name == "lion":
        from lion_pytorch import Lion

        # decoupled_weight_decay=False is AdamW-style decay: p *= 1 - lr * weight_decay.
        return Lion(groups, lr=default_lr, betas=betas, weight_decay=config.weight_decay)

    if config.name == "adafactor":
        # Imported here: transformers costs seconds to import and only Adafactor needs it.
        from transformers.optimization import Adafactor

        return Adafactor(
            groups,
            lr=default_lr,
            weight_decay=config.weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )

    if config.name == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy raises at its first step otherwise; fail here, before any compute.
        rates = sorted({group["lr"] for group in groups if group["lr"] != 0.0})
        if len(rates) > 1:
            named = ", ".join(f"{group['name']}={group['lr']:g}" for group in groups)
            raise ValueError(
                f"train.optimizer.name=prodigy needs one learning rate for every trained part, got {named}; "
                "leave train.text_encoder_1.lr / text_encoder_2.lr null so they use train.lr"
            )
        for group in groups:
            if abs(group["lr"] - 1.0) > _PRODIGY_LR_TOLERANCE:
                log.warning(
                    "prodigy estimates the step size itself and expects lr=1.0, but group '%s' has lr=%g; "
                    "set train.lr (and text encoder lr) to 1.0 unless you mean to scale Prodigy's estimate",
                    group["name"],
                    group["lr"],
                )
        return Prodigy(groups, lr=default_lr, betas=betas, eps=config.eps, weight_decay=config.weight_decay)

    raise ValueError(
        f"train.optimizer.name={config.name!r} is unknown; allowed: adamw, adamw8bit, lion, adafactor, prodigy"
    )
