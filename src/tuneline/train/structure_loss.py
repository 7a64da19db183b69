"""The style/structure loss (train.loss.structure, datasets[].loss.structure): the Z-Image trainer's
StyleStructureLoss, in latent space through the family's latent -> RGB projection.

The seed (None9527/None_Z-image-Turbo_trainer, src/zimage_trainer/losses/style_structure_loss.py) defines
four terms on Lab images: struct = 1 - SSIM of L, light = L1 between the mean and the standard deviation
of L, color = the same on a and b, tex = L1 of the high-pass of L (L minus a Gaussian blur). Its trainer
applies them to the predicted clean latent x0 against the clean latent, in fp32, treating latent channel 0
as L and channels 1-3 as colour; the per_dataset scope of its fork (tarkansarim/None_Z-image-Turbo_trainer_Plus,
scripts/train_acrf.py) picks each sample's four weights by its data set and averages
base + sum(w_k * term_k) over the batch.

Here the latents are projected to approximate RGB with the family's linear factors (its adapter's
`latent_rgb`: the ones live previews use, on the model-space latents previews see), mapped from [-1, 1] to
[0, 1] as previews are, converted to Lab (sRGB -> linear -> XYZ (D65) -> Lab) and scaled by 1/100 (L in
[0, 1], a and b in about [-1, 1], so the terms are of the order of the diffusion loss; the seed's pixel loss
takes moments and high-pass on L in 0..100). Every term is per sample: SSIM averaged over each sample's map,
moments over each sample's pixels. Each sample adds its data set's loss weight times the sum of its data
set's weights times its terms to its diffusion loss (whose noise-level weighting the terms do not get, as in
the seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneline.core.params import ParamsError
from tuneline.models.loading import host_to_device
from tuneline.train.config import STRUCTURE_TERMS

SSIM_WINDOW = 11  # the seed's ssim_window_size
BLUR_KERNEL = 7  # the seed's blur_kernel_size
GAUSSIAN_SIGMA = 1.5  # both windows' sigma, as the seed's
LAB_SCALE = 100.0
STD_EPS = 1e-12  # under the square root of the variance: a flat (fully clamped) image has a finite gradient

# sRGB (D65) -> XYZ, and the D65 white point (the seed's rgb_to_lab).
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
_WHITE = (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0


@dataclass(frozen=True)
class LatentRGB:
    """A family's linear latent -> RGB projection, the one live previews use instead of the VAE decoder:
    rgb = latents . factors + bias per pixel, on the latents the denoiser sees (scaled and shifted by the
    VAE's scaling_factor / shift_factor: what the training batches hold), giving RGB in about [-1, 1]."""

    factors: tuple[tuple[float, float, float], ...]  # one (R, G, B) row per latent channel
    bias: tuple[float, float, float]
    source: str  # where the numbers come from

    @property
    def channels(self) -> int:
        return len(self.factors)


def latent_to_rgb(latents: Any, projection: LatentRGB) -> Any:
    """Approximate RGB in [0, 1] (unclamped) of model-space latents (batch, C, H, W), fp32."""
    import torch

    if latents.shape[1] != projection.channels:
        raise ParamsError(
            f"train.loss.structure: the latents have {latents.shape[1]} channels but the family's latent -> RGB "
            f"factors ({projection.source}) are for {projection.channels}: the style/structure loss needs the "
            "family's own VAE latent layout; allowed: all weights 0 (train.loss.structure and "
            "datasets[].loss.structure) with this VAE")
    # Made on the host and copied without waiting for the GPU (a plain copy would sync every step).
    factors = host_to_device(torch.tensor(projection.factors, dtype=torch.float32), latents.device)
    bias = host_to_device(torch.tensor(projection.bias, dtype=torch.float32), latents.device)
    rgb = torch.einsum("bchw,cr->brhw", latents.float(), factors) + bias.view(1, 3, 1, 1)
    return (rgb + 1.0) / 2.0


def rgb_to_lab(rgb: Any) -> Any:
    """Lab / 100 of sRGB in [0, 1] (clamped first, as the seed does): (batch, 3, H, W) -> L, a, b."""
    import torch

    rgb = rgb.clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = host_to_device(torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype), rgb.device)
    white = host_to_device(torch.tensor(_WHITE, dtype=rgb.dtype), rgb.device).view(1, 3, 1, 1)
    xyz = torch.einsum("bchw,rc->brhw", linear, matrix) / white
    # The cube root's branch is clamped to where it is taken: torch.where passes the gradient of both
    # branches on, and the cube root's is infinite at 0 (0 * inf = NaN).
    cube_root = xyz.clamp(min=_DELTA**3) ** (1.0 / 3.0)
    f = torch.where(xyz > _DELTA**3, cube_root, xyz / (3 * _DELTA**2) + 4.0 / 29.0)
    lightness = 116.0 * f[:, 1:2] - 16.0
    a = 500.0 * (f[:, 0:1] - f[:, 1:2])
    b = 200.0 * (f[:, 1:2] - f[:, 2:3])
    return torch.cat([lightness, a, b], dim=1) / LAB_SCALE


def gaussian_window(size: int, sigma: float, like: Any) -> Any:
    """The normalised 2-D Gaussian (1, 1, size, size) of the seed's windows."""
    import torch

    coords = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g.outer(g).view(1, 1, size, size)


def _filter(x: Any, window: Any) -> Any:
    """Each channel convolved with `window`, zero padding, same size (the seed's conv2d)."""
    import torch.nn.functional as F

    channels = x.shape[1]
    return F.conv2d(x, window.expand(channels, 1, -1, -1), padding=window.shape[-1] // 2, groups=channels)


def ssim(x: Any, y: Any, data_range: float = 1.0) -> Any:
    """SSIM of each sample (the mean of its SSIM map), the seed's Gaussian window and constants."""
    window = gaussian_window(SSIM_WINDOW, GAUSSIAN_SIGMA, x)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x**2
    var_y = _filter(y * y, window) - mu_y**2
    cov = _filter(x * y, window) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1)


def _moments(x: Any) -> tuple[Any, Any]:
    """(mean, standard deviation) over each sample's pixels, per channel: (batch, channels) each; the
    sample standard deviation (n - 1), as the seed's torch.std."""
    flat = x.flatten(2)
    mean = flat.mean(dim=2)
    variance = ((flat - mean.unsqueeze(2)) ** 2).sum(dim=2) / (flat.shape[2] - 1)
    return mean, (variance + STD_EPS).sqrt()


def moments_loss(x: Any, y: Any) -> Any:
    """|mean x - mean y| + |std x - std y| of each sample, averaged over the channels."""
    mean_x, std_x = _moments(x)
    mean_y, std_y = _moments(y)
    return ((mean_x - mean_y).abs() + (std_x - std_y).abs()).mean(dim=1)


def high_pass(x: Any) -> Any:
    """x minus its Gaussian blur (the seed's get_high_freq)."""
    return x - _filter(x, gaussian_window(BLUR_KERNEL, GAUSSIAN_SIGMA, x))


def structure_terms(x0_pred: Any, x0: Any, projection: LatentRGB) -> Any:
    """The four terms of each sample, unweighted: (batch, 4) in STRUCTURE_TERMS order (struct, light,
    color, tex), in fp32 whatever autocast is on."""
    import torch

    with torch.autocast(device_type=x0_pred.device.type, enabled=False):
        pred = rgb_to_lab(latent_to_rgb(x0_pred.float(), projection))
        target = rgb_to_lab(latent_to_rgb(x0.float(), projection))
        pred_l, target_l = pred[:, :1], target[:, :1]
        struct = 1.0 - ssim(pred_l, target_l)
        light = moments_loss(pred_l, target_l)
        color = moments_loss(pred[:, 1:], target[:, 1:])
        tex = (high_pass(pred_l) - high_pass(target_l)).abs().flatten(1).mean(dim=1)
        return torch.stack([struct, light, color, tex], dim=1)


def with_structure(weighted: Any, batch: dict[str, Any], x0_pred: Any, x0: Any,
                   projection: LatentRGB) -> tuple[Any, dict[str, Any]]:
    """Each sample's loss, `weighted` (its weighted diffusion loss) plus the style/structure terms times
    the sample's weights (batch["structure"], its data set's) and its data set's loss weight, and the
    metrics to log (device tensors: no host sync). A batch without "structure" (every weight 0) comes
    back as it is, with no metrics.

    Metrics: loss/diffusion and loss/structure (the batch means of the two parts), loss/<term> (each
    term's batch mean, unweighted), and per data set in the batch dataset/<name>/loss (its samples'
    mean loss), dataset/<name>/diffusion and dataset/<name>/<term>."""
    import torch

    weights = batch.get("structure")
    if weights is None:
        return weighted, {}
    terms = structure_terms(x0_pred, x0, projection)
    weights = weights.to(terms.device, torch.float32)
    structure = (terms * weights).sum(dim=1) * batch["loss_weight"].to(terms.device, torch.float32)
    total = weighted + structure
    parts = torch.cat([total[:, None], weighted[:, None], terms], dim=1).detach()  # loss, diffusion, terms
    names = ("loss", "diffusion", *STRUCTURE_TERMS)
    metrics = {"loss/diffusion": parts[:, 1].mean(), "loss/structure": structure.detach().mean()}
    metrics |= {f"loss/{term}": parts[:, 2 + k].mean() for k, term in enumerate(STRUCTURE_TERMS)}
    datasets = sorted(set(batch["datasets"]))
    # Per data set means through a membership matrix made on the host: no boolean indexing, no sync.
    member = torch.tensor([[float(name == d) for name in batch["datasets"]] for d in datasets])
    member = host_to_device(member / member.sum(dim=1, keepdim=True), terms.device)
    means = member @ parts
    for d, dataset in enumerate(datasets):
        metrics |= {f"dataset/{dataset}/{name}": means[d, k] for k, name in enumerate(names)}
    return total, metrics


def metric_names(datasets: list[str]) -> list[str]:
    """Every metric with_structure may report for these data sets, in a stable order (the loss curve's columns)."""
    names = ["loss/diffusion", "loss/structure", *(f"loss/{term}" for term in STRUCTURE_TERMS)]
    for dataset in datasets:
        names += [f"dataset/{dataset}/{name}" for name in ("loss", "diffusion", *STRUCTURE_TERMS)]
    return names
