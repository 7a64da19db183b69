"""Flow-matching training math (rectified flow, as SD3, Flux and Z-Image train): the noisy
input, the velocity target, the noise-level (sigma) sampling with its shift, the SD3 loss
weightings and the weighted per-sample loss. Pure functions on tensors; torch is imported
inside them.

Convention (the one diffusers' FlowMatchEulerDiscreteScheduler and training scripts use):

    x_t = (1 - sigma) * x0 + sigma * noise        sigma in [0, 1]; 0 = data, 1 = pure noise
    v   = d x_t / d sigma = noise - x0            the velocity target

Checked against the installed diffusers 0.42.1 (and numerically in tests/test_flow_matching.py):

- `FlowMatchEulerDiscreteScheduler.scale_noise` (schedulers/scheduling_flow_match_euler_discrete.py
  line 234) is `sigma * noise + (1 - sigma) * sample`: our `noisy_latents`.
- `FlowMatchEulerDiscreteScheduler.step` (same file, lines 513 and 520) is
  `prev = sample + (sigma_next - sigma) * model_output`, an Euler step of d x / d sigma: the
  model_output it expects is `noise - x0`, our `velocity_target`. One step with that output from
  x_sigma lands exactly on x_sigma_next of the same straight line.
- `set_timesteps` sets `timesteps = sigmas * num_train_timesteps` (line 376).

Z-Image (pipelines/z_image/pipeline_z_image.py) feeds its transformer something else:

- line 511: `timestep = (1000 - t) / 1000` with t from `scheduler.timesteps`, i.e. the
  transformer's time input is `1 - sigma` (0 = pure noise, 1 = clean image); the transformer
  multiplies it by its `t_scale` (1000.0, models/transformers/transformer_z_image.py lines 383
  and 955) itself. `zimage_timestep` reproduces this arithmetic exactly.
- line 568: `noise_pred = -noise_pred` before `scheduler.step` (line 571): the transformer's raw
  output is the NEGATED velocity, `x0 - noise`. So the adapter trains
  `ZIMAGE_OUTPUT_SIGN * transformer_output` (see `zimage_velocity`) against `noise - x0`.

Sigma sampling follows diffusers' `compute_density_for_timestep_sampling` (training_utils.py
line 366) draw for draw, and uses the draw as sigma itself (the SD3 paper's t; logit_mean > 0
leans towards noise). diffusers' SD3/Flux scripts instead index their descending
`scheduler.timesteps` with floor(u * 1000), i.e. sigma ~ 1 - u on a 1000-step grid; for the
symmetric defaults (uniform, logit_normal with mean 0, mode) the distributions agree.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from tuneline.train.config import LossConfig
from tuneline.train.loss import NoiseLevels, per_sample_loss, per_sample_mse

SigmaScheme = Literal["uniform", "logit_normal", "mode"]
WeightingScheme = Literal["none", "sigma_sqrt", "cosmap"]
SIGMA_SCHEMES = ("uniform", "logit_normal", "mode")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")

# The Z-Image transformer outputs x0 - noise; the pipeline negates it before the Euler step.
ZIMAGE_OUTPUT_SIGN = -1.0


def per_sample(sigmas: Any, like: Any) -> Any:
    """sigmas of shape (batch,) (or a number) viewed to broadcast over `like` (batch, ...)."""
    import torch

    sigmas = torch.as_tensor(sigmas, device=like.device)
    if sigmas.ndim == 0:
        return sigmas
    if sigmas.ndim != 1 or sigmas.shape[0] != like.shape[0]:
        raise ValueError(f"sigmas must have shape ({like.shape[0]},), got {tuple(sigmas.shape)}")
    return sigmas.reshape(-1, *([1] * (like.ndim - 1)))


def noisy_latents(x0: Any, noise: Any, sigmas: Any) -> Any:
    """x_t = (1 - sigma) * x0 + sigma * noise, one sigma per sample (the scheduler's scale_noise)."""
    sigma = per_sample(sigmas, x0).to(x0.dtype)
    return (1.0 - sigma) * x0 + sigma * noise


def velocity_target(x0: Any, noise: Any) -> Any:
    """The flow-matching target noise - x0 (d x_t / d sigma; what scheduler.step consumes)."""
    return noise - x0


def predicted_x0(noisy: Any, velocity: Any, sigmas: Any) -> Any:
    """The clean latent a velocity prediction implies, x0 = x_t - sigma * v, in fp32 (x_t = (1 - sigma) x0
    + sigma noise and v = noise - x0 give x_t - sigma v = x0 exactly)."""
    return noisy.float() - per_sample(sigmas, noisy).float() * velocity.float()


def zimage_timestep(sigmas: Any, num_train_timesteps: int = 1000) -> Any:
    """The Z-Image transformer's time input for noise level sigma, as ZImagePipeline computes it:
    the scheduler's timestep t = sigma * N, then (N - t) / N, i.e. 1 - sigma (1 = clean)."""
    import torch

    timesteps = torch.as_tensor(sigmas, dtype=torch.float32) * num_train_timesteps
    return (num_train_timesteps - timesteps) / num_train_timesteps


def zimage_velocity(transformer_output: Any) -> Any:
    """The velocity (noise - x0) from the Z-Image transformer's raw output (which is x0 - noise)."""
    return ZIMAGE_OUTPUT_SIGN * transformer_output


# --- sigma sampling ------------------------------------------------------------------------


def sample_density(
    scheme: str,
    batch: int,
    generator: Any = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: Any = "cpu",
) -> Any:
    """u in [0, 1] per sample, exactly as diffusers' compute_density_for_timestep_sampling draws it
    (same generator calls, so the same numbers)."""
    import torch

    _check(scheme, SIGMA_SCHEMES, "timestep sampling scheme")
    if scheme == "logit_normal":
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch,), device=device, generator=generator)
        return torch.sigmoid(u)
    u = torch.rand(size=(batch,), device=device, generator=generator)
    if scheme == "mode":
        # SD3 paper eq. 20: heavier in the middle for mode_scale > 0, symmetric about 0.5.
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def static_shift(sigmas: Any, shift: float) -> Any:
    """sigma' = shift * s / (1 + (shift - 1) * s): the scheduler's fixed shift (shift > 1: noisier)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu, linear in the number of image tokens (pipeline_z_image.py calculate_shift, from Flux)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


def time_shift(mu: float, sigmas: Any, exponent: float = 1.0, kind: str = "exponential") -> Any:
    """The scheduler's resolution-dependent shift of sigma t: exp(mu) / (exp(mu) + (1/t - 1)^exponent)
    ("exponential", the default) or mu / (mu + (1/t - 1)^exponent) ("linear")."""
    _check(kind, ("exponential", "linear"), "time_shift_type")
    scale = math.exp(mu) if kind == "exponential" else mu
    return scale / (scale + (1 / sigmas - 1) ** exponent)


def image_seq_len(latent_size: tuple[int, int], patch_size: int = 2) -> int:
    """Image tokens of a latent of (height, width): ZImagePipeline uses (h // 2) * (w // 2)."""
    height, width = latent_size
    return (height // patch_size) * (width // patch_size)


def scheduler_shift(sigmas: Any, scheduler_config: dict[str, Any], latent_size: tuple[int, int]) -> Any:
    """Shift sigmas as the pipeline's scheduler shifts its inference sigmas for this latent size.

    With `use_dynamic_shifting`: mu = calculate_shift(tokens, config's base_image_seq_len,
    max_image_seq_len, base_shift, max_shift; the pipeline's defaults where a key is missing),
    then time_shift(mu, 1.0, sigmas) of the config's time_shift_type. Otherwise the static
    config `shift` (1.0: none). shift_terminal and karras/exponential/beta schedules reshape a
    whole inference schedule and have no per-sample meaning; they are not applied.
    """
    config = scheduler_config
    if config.get("use_dynamic_shifting", False):
        mu = calculate_shift(
            image_seq_len(latent_size),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return time_shift(mu, sigmas, 1.0, config.get("time_shift_type", "exponential"))
    return static_shift(sigmas, float(config.get("shift", 1.0)))


def sample_sigmas(
    batch: int,
    scheme: str = "logit_normal",
    generator: Any = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: Union[float, str, None] = None,
    scheduler_config: Optional[dict[str, Any]] = None,
    latent_size: Optional[tuple[int, int]] = None,
    device: Any = "cpu",
) -> Any:
    """One noise level per sample: a draw of `scheme` (see sample_density), then the shift.

    shift: None or 1.0 none; a number: the static shift; "auto": the shift the pipeline's scheduler
    uses at inference for `latent_size` (needs `scheduler_config`, the scheduler's config dict).
    """
    sigmas = sample_density(scheme, batch, generator, logit_mean, logit_std, mode_scale, device)
    if shift == "auto":
        if scheduler_config is None or latent_size is None:
            raise ValueError('shift="auto" needs the scheduler_config and the latent_size')
        return scheduler_shift(sigmas, scheduler_config, latent_size)
    if isinstance(shift, str):
        raise ValueError(f"shift must be 'auto', a number or None, got {shift!r}")
    if shift is None or shift == 1.0:
        return sigmas
    return static_shift(sigmas, float(shift))


# --- loss ----------------------------------------------------------------------------------


def loss_weighting(scheme: str, sigmas: Any) -> Any:
    """Per-sample loss weights from sigma, as diffusers' compute_loss_weighting_for_sd3:
    none 1, sigma_sqrt sigma^-2, cosmap 2 / (pi * (1 - 2 sigma + 2 sigma^2))."""
    import torch

    _check(scheme, WEIGHTING_SCHEMES, "loss weighting scheme")
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def flow_noise_levels(sigmas: Any, num_train_timesteps: int = 1000) -> NoiseLevels:
    """The noise levels the Huber schedules read, of flow-matching sigmas.

    exponential: t = sigma * 1000 of 1000, as sd-scripts' SD3 and Flux scripts pass their timesteps (huber_c^sigma:
    1 at the clean end, huber_c at pure noise). snr: 1/sqrt(SNR) of x_t = (1 - sigma) x0 + sigma noise, i.e.
    sigma / (1 - sigma) (x_t / (1 - sigma) = x0 + sigma / (1 - sigma) noise, the DDPM sigma
    sqrt((1 - ab) / ab) of the same SNR), so a DDPM and a flow sample at one SNR get one threshold:
    huber_c + (1 - huber_c)(1 - sigma)^2; inf at sigma 1 gives huber_c. sd-scripts refuses snr for its flow
    schedulers (no alphas_cumprod); SimpleTuner uses sqrt((1 - sigma) / sigma), which runs the other way
    (huber_c at the clean end): we keep the DDPM direction."""
    import torch

    sigmas = torch.as_tensor(sigmas).float()
    return NoiseLevels(sigmas * num_train_timesteps, num_train_timesteps, sigmas / (1.0 - sigmas))


def flow_matching_loss(
    prediction: Any,
    target: Any,
    weighting: Any = None,
    per_sample_weight: Any = None,
    reduce: bool = True,
    loss: Optional[LossConfig] = None,
    sigmas: Any = None,
    mask: Any = None,
) -> Any:
    """The per-element loss of `loss.type` (None: squared error) averaged over each sample (fp32), times the
    sigma weighting and the per-sample (data-set) weight; the batch mean, or the weighted per-sample vector
    with reduce=False. The same shape of loss as the SDXL adapter's (per_sample * weights).mean(). The Huber
    schedules read `sigmas` (each sample's noise level); `mask` (tuneline.train.loss.MaskWeights, train.masked_loss)
    weights each element before the per-sample mean."""
    if loss is None or loss.type == "l2":
        losses = per_sample_mse(prediction, target, mask)
    else:
        if sigmas is None:
            raise ValueError(f"train.loss.type {loss.type!r} needs the sigmas (its threshold follows the noise level)")
        losses = per_sample_loss(prediction, target, loss, flow_noise_levels(sigmas), mask)
    if weighting is not None:
        losses = losses * weighting.to(losses.device).float()
    if per_sample_weight is not None:
        losses = losses * per_sample_weight.to(losses.device).float()
    return losses.mean() if reduce else losses


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
