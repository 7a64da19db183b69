"""Diffusion loss weighting: per-sample MSE, min-SNR-gamma, minimum-sigma, data-set weights; the clean latent
a DDPM prediction implies."""

from __future__ import annotations

from typing import Any

from tuneline.train.config import LossConfig


def per_sample_mse(prediction: Any, target: Any) -> Any:
    """Mean squared error of each sample (in fp32: fp16 squares overflow)."""
    error = (prediction.float() - target.float()) ** 2
    return error.mean(dim=tuple(range(1, error.ndim)))


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
