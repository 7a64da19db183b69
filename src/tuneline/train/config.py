"""Settings of the trainer core's own units: optimizer, LR schedule, loss weighting, EMA and
checkpoints. Plain pydantic, no torch: validation stays instant. A training stage composes
them into its params section (`tuneline.stages.train.config.TrainConfig`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BeforeValidator, Field

from tuneline.core.params import Section


class OptimizerConfig(Section):
    """The optimizer."""

    name: Literal["adamw", "adamw8bit", "lion", "adafactor", "prodigy"] = Field(
        "adamw",
        description="adamw (torch), adamw8bit (bitsandbytes, CUDA), lion (lion-pytorch), adafactor "
        "(transformers), prodigy (prodigyopt; use lr 1.0).",
    )
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/Lion/Prodigy betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")


class ScheduleConfig(Section):
    """The learning-rate schedule: a factor of train.lr per optimizer step."""

    name: Literal["constant", "linear", "cosine", "cosine_with_restarts"] = Field(
        "constant", description="Shape after warmup: constant, linear decay, cosine decay, cosine with restarts."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 over this many optimizer steps.")
    min_factor: float = Field(0.0, ge=0, le=1, description="Lowest factor the decay reaches (fraction of lr).")
    cycle_steps: Optional[int] = Field(
        None, ge=1, description="cosine_with_restarts: length of the first cycle; null splits the run in 4."
    )
    cycle_mult: float = Field(1.0, ge=1, description="cosine_with_restarts: each cycle is this many times longer.")


class LossConfig(Section):
    """How the diffusion loss is weighted."""

    min_snr_gamma: Optional[float] = Field(
        None, gt=0, description="Min-SNR-gamma weighting (5 is common); null: plain MSE."
    )
    noise_offset: float = Field(0.0, ge=0, description="Noise offset (0.0357 is common); 0 disables it.")
    min_sigma: Optional[float] = Field(
        None,
        gt=0,
        description="Minimum-sigma weighting: samples with noise level sigma below this get weight sigma/min_sigma, "
        "so near-clean timesteps do not dominate; null disables it.",
    )
    min_sigma_warmup_steps: int = Field(
        0, ge=0, description="Ramp min_sigma in linearly from 0 over this many steps."
    )


def _parse_shift(value: Any) -> Any:
    """'auto' or a number > 0 (YAML may hand numbers over as strings)."""
    if value == "auto":
        return value
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not number > 0:
        raise ValueError("expected 'auto' (the pipeline scheduler's shift for the resolution) or a number > 0")
    return number


Shift = Annotated[Union[Literal["auto"], float], BeforeValidator(_parse_shift)]


class FlowMatchingConfig(Section):
    """Noise levels and loss weighting of a flow-matching model (Z-Image, Flux): see
    `tuneline.train.flow_matching`."""

    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = Field(
        "logit_normal",
        description="How each sample's noise level sigma is drawn before the shift: uniform in [0, 1], "
        "logit_normal (sigmoid of a normal with logit_mean, logit_std), or mode (SD3's mode sampling, "
        "mode_scale).",
    )
    logit_mean: float = Field(0.0, description="logit_normal: mean of the normal; > 0 leans towards noise.")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: standard deviation of the normal.")
    mode_scale: float = Field(1.29, description="mode: scale; > 0 puts more samples at middle noise levels.")
    shift: Shift = Field(
        "auto",
        description="Shift of the drawn sigmas towards noise: 'auto' uses the shift the model's scheduler "
        "uses at inference (its static shift, or the resolution-dependent one when use_dynamic_shifting), "
        "a number a static shift s*sigma/(1+(s-1)*sigma); 1.0 none.",
    )
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none",
        description="Per-sample loss weight from sigma (SD3): none, sigma_sqrt (sigma^-2), cosmap.",
    )


class EmaConfig(Section):
    """Exponential moving average of the trained weights."""

    enabled: bool = Field(False, description="Keep an EMA copy of the trained weights.")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per update.")
    warmup: bool = Field(
        True,
        description="Ramp the decay in as min(decay, (1+n)/(10+n)), n = updates so far, so the average "
        "follows the weights closely early on (diffusers' default).",
    )
    every: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")
    start_step: int = Field(0, ge=0, description="Start averaging after this many optimizer steps (e.g. warmup).")
    on_cpu: bool = Field(False, description="Keep the EMA weights on the CPU to save GPU memory.")


class CheckpointConfig(Section):
    """When and how many resumable checkpoints are kept."""

    every_steps: Optional[int] = Field(50, ge=1, description="Save every N optimizer steps; null: never by steps.")
    every_epochs: Optional[int] = Field(None, ge=1, description="Save every N epochs; null: never by epochs.")
    keep_last: int = Field(2, ge=1, description="Keep this many most recent checkpoints.")
