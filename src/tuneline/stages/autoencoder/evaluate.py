"""PSNR and SSIM of a VAE's reconstructions of the held-out images, and reconstruction sheets.

No maintained implementation is installed (torchmetrics, scikit-image), so both are computed
here: PSNR on [0, 1] pixels, SSIM with the usual 11x11 Gaussian window (sigma 1.5) per channel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def psnr(a: Any, b: Any) -> float:
    """PSNR in dB of two image batches in [-1, 1]."""
    import torch

    mse = torch.mean(((a.float() + 1) / 2 - (b.float() + 1) / 2).clamp(-1, 1) ** 2)
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))


def ssim(a: Any, b: Any) -> float:
    """Mean SSIM of two image batches (N, C, H, W) in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    x, y = (a.float() + 1) / 2, (b.float() + 1) / 2
    coords = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 11, 11).contiguous()

    def blur(t: Any) -> Any:
        return F.conv2d(t, window, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(value.mean())


def evaluate(vae: Any, holdout: dict[str, list[tuple[str, Any]]],
             reconstruct: Callable[[Any, Any], Any]) -> dict[str, float]:
    """psnr/<data set>, ssim/<data set> and their means over every held-out image; `reconstruct(vae, pixels)`
    is the kind's deterministic reconstruction (its adapter's: a KL VAE's posterior mode, a VQ model's codes)."""
    import torch

    metrics: dict[str, float] = {}
    everything = []
    for dataset, items in sorted(holdout.items()):
        pixels = torch.stack([p for _, p in items])
        out = reconstruct(vae, pixels)
        metrics[f"psnr/{dataset}"], metrics[f"ssim/{dataset}"] = psnr(pixels, out), ssim(pixels, out)
        everything.append((pixels, out))
    if everything:
        metrics["psnr"] = sum(metrics[k] for k in metrics if k.startswith("psnr/")) / len(everything)
        metrics["ssim"] = sum(metrics[k] for k in metrics if k.startswith("ssim/")) / len(everything)
    return metrics


def reconstruction_sheet(rows: list[tuple[Any, Any, Any]], path: Path) -> Path:
    """A PNG with one row per image: input | reference (base VAE; random start for vq) | trained."""
    import numpy as np
    from PIL import Image

    from tuneline.core.fsutil import atomic_path

    def to_array(t: Any) -> Any:
        return ((t.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()

    sheet = np.concatenate([np.concatenate([to_array(c) for c in row], axis=1) for row in rows], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    return path
