"""The diffusion loss: per-sample MSE or the scheduled pseudo-Huber / smooth-L1 loss (train.loss.type), min-SNR-gamma,
minimum-sigma, data-set weights; the clean latent a DDPM prediction implies.

The Huber forms and schedules are kohya sd-scripts' (library/train_util.py conditional_loss and
get_huber_threshold_if_needed, from "Improving Diffusion Models's Data-Corruption Resistance using Scheduled
Pseudo-Huber Loss", Khrapov et al. 2024); SimpleTuner has the same. Both families reach them through
`per_sample_loss` with the `NoiseLevels` of their objective (ddpm_noise_levels here, flow_matching.flow_noise_levels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tuneline.train.config import LossConfig, MaskedLossConfig


@dataclass(frozen=True)
class MaskWeights:
    """Per-position loss weights of a batch (train.masked_loss): max(mask, unmasked_weight), shaped to broadcast
    over the prediction ((batch, 1, h, w) for a (batch, channels, h, w) latent); `normalize` divides each
    sample's weighted mean by the mean of its weights (OneTrainer's normalize_masked_area_loss)."""

    weights: Any
    normalize: bool


def mask_weights(batch: dict[str, Any], config: MaskedLossConfig) -> MaskWeights | None:
    """The batch's mask weights, or None where masked loss is off or the batch has no mask (the plain loss)."""
    mask = batch.get("mask")
    if not config.enabled or mask is None:
        return None
    return MaskWeights(mask.float().clamp(min=config.unmasked_weight, max=1.0), config.normalize)


def _reduce(losses: Any, mask: MaskWeights | None) -> Any:
    """Each sample's mean of the per-element `losses`, weighted by `mask` when given."""
    dims = tuple(range(1, losses.ndim))
    if mask is None:
        return losses.mean(dim=dims)
    weights = mask.weights.to(losses.device)
    weighted = (losses * weights).mean(dim=dims)
    if not mask.normalize:
        return weighted
    # Mean of the weights over the same elements (a (b, 1, h, w) map counts once per channel: the same mean).
    coverage = weights.expand_as(losses).mean(dim=dims)
    # An all-black mask with unmasked_weight 0 trains nothing: 0, not 0/0.
    return weighted / coverage.clamp(min=1e-6)


def per_sample_mse(prediction: Any, target: Any, mask: MaskWeights | None = None) -> Any:
    """Mean squared error of each sample (in fp32: fp16 squares overflow), weighted by `mask` when given."""
    error = (prediction.float() - target.float()) ** 2
    return _reduce(error, mask)


@dataclass(frozen=True)
class NoiseLevels:
    """Where each sample of a batch sits on its noise schedule, in the two forms the Huber schedules read."""

    timesteps: Any  # (batch,) t on the 0..num_train_timesteps scale, 0 = clean (flow matching: sigma * 1000)
    num_train_timesteps: int
    sigmas: Any  # (batch,) 1/sqrt(SNR) = sqrt((1 - alpha_bar) / alpha_bar) (flow matching: sigma / (1 - sigma))


def ddpm_noise_levels(alphas_cumprod: Any, timesteps: Any, num_train_timesteps: int) -> NoiseLevels:
    """The noise levels of DDPM timesteps (sd-scripts' sigmas = ((1 - ab) / ab) ** 0.5; inf where ab is 0, the
    last step of a zero-terminal-SNR schedule, which the snr schedule maps to huber_c)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return NoiseLevels(timesteps.float(), num_train_timesteps, ((1.0 - alpha_bar) / alpha_bar) ** 0.5)


def huber_threshold(config: LossConfig, levels: NoiseLevels) -> Any:
    """The pseudo-Huber threshold c of each sample (fp32), as sd-scripts' get_huber_threshold_if_needed with
    huber_scale 1: constant huber_c; exponential exp(-alpha t) with alpha = -ln(huber_c) / T, i.e. huber_c^(t/T);
    snr (1 - huber_c) / (1 + sigma)^2 + huber_c. Both schedules give 1 at the clean end, huber_c at full noise."""
    import torch

    c = config.huber_c
    if config.huber_schedule == "exponential":
        alpha = -math.log(c) / levels.num_train_timesteps
        return torch.exp(-alpha * levels.timesteps.float())
    if config.huber_schedule == "snr":
        return (1 - c) / (1 + levels.sigmas.float()) ** 2 + c
    return torch.full(levels.timesteps.shape, c, dtype=torch.float32, device=levels.timesteps.device)


def per_sample_loss(prediction: Any, target: Any, config: LossConfig, levels: NoiseLevels,
                    mask: MaskWeights | None = None) -> Any:
    """Each sample's mean per-element loss of train.loss.type, in fp32 (before any weighting).

    l2: per_sample_mse, the very same computation. huber: 2c(sqrt(r^2 + c^2) - c); smooth_l1:
    2(sqrt(r^2 + c^2) - c), with r = prediction - target and c = huber_threshold per sample (sd-scripts'
    conditional_loss). sqrt(r^2 + c^2) - c is computed as r^2 / (sqrt(r^2 + c^2) + c), the same number
    without the cancellation that loses the digits of small residuals in fp32. `mask` (train.masked_loss)
    weights each element of whichever loss before the mean."""
    if config.type == "l2":
        return per_sample_mse(prediction, target, mask)
    squared = (prediction.float() - target.float()) ** 2
    c = huber_threshold(config, levels).to(squared.device).reshape(-1, *([1] * (squared.ndim - 1)))
    excess = squared / ((squared + c * c).sqrt() + c)
    losses = 2 * c * excess if config.type == "huber" else 2 * excess
    return _reduce(losses, mask)


def per_sample_loss_and_mse(prediction: Any, target: Any, config: LossConfig, levels: NoiseLevels,
                            mask: MaskWeights | None = None) -> tuple[Any, Any]:
    """(per_sample_loss, per_sample_mse): the training loss and the plain squared error the validation reports
    beside it (val/loss_unweighted, comparable across loss types and masks); for plain l2 the same tensor twice."""
    loss = per_sample_loss(prediction, target, config, levels, mask)
    return loss, loss if config.type == "l2" and mask is None else per_sample_mse(prediction, target)


def snr_of(alphas_cumprod: Any, timesteps: Any) -> Any:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


# Floor of alpha_bar where x0 is recovered from an epsilon prediction: with zero terminal SNR the last
# timestep has alpha_bar 0, where epsilon says nothing about x0 (a v prediction still does).
MIN_ALPHA_BAR = 1e-8


def ddpm_x0(prediction: Any, noisy: Any, alphas_cumprod: Any, timesteps: Any, prediction_type: str) -> Any:
    """The clean latent a DDPM model's prediction implies at x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, in fp32:
    epsilon: (x_t - sqrt(1 - ab) eps) / sqrt(ab); v_prediction (v = sqrt(ab) eps - sqrt(1 - ab) x0):
    sqrt(ab) x_t - sqrt(1 - ab) v."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    alpha_bar = alpha_bar.reshape(-1, *([1] * (noisy.ndim - 1)))
    noisy, prediction = noisy.float(), prediction.float()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1.0 - alpha_bar).sqrt() * prediction
    if prediction_type == "epsilon":
        return (noisy - (1.0 - alpha_bar).sqrt() * prediction) / alpha_bar.clamp(min=MIN_ALPHA_BAR).sqrt()
    raise ValueError(f"no clean latent from prediction type {prediction_type!r}; allowed: epsilon, v_prediction")


def loss_weights(config: LossConfig, snr: Any, prediction_type: str, step: int) -> Any:
    """Per-sample weights from the noise level alone (data-set weights are applied separately).

    min-SNR-gamma (Hang et al. 2023): min(snr, gamma)/snr for epsilon, min(snr, gamma)/(snr + 1)
    for v-prediction. Minimum sigma: sigma = sqrt(1/snr); samples below min_sigma are scaled
    by sigma/min_sigma, with min_sigma ramped in over its warmup.
    """
    import torch

    weights = torch.ones_like(snr)
    # Zero-terminal-SNR schedules have snr == 0 at the last step: keep divisions finite.
    safe_snr = snr.clamp(min=1e-8)
    if config.min_snr_gamma is not None:
        clipped = torch.minimum(snr, torch.full_like(snr, config.min_snr_gamma))
        weights = weights * (clipped / (safe_snr + 1.0) if prediction_type == "v_prediction" else clipped / safe_snr)
    if config.min_sigma is not None:
        ramp = 1.0 if config.min_sigma_warmup_steps == 0 else min(1.0, step / config.min_sigma_warmup_steps)
        floor = config.min_sigma * ramp
        if floor > 0:
            sigma = safe_snr.rsqrt()
            weights = weights * (sigma / floor).clamp(max=1.0)
    return weights
