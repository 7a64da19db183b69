"""Diffusion loss weighting: per-sample MSE, min-SNR-gamma, minimum-sigma, data-set weights."""

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
