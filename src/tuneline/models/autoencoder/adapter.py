"""The autoencoder adapter (kind kl): fine-tune an AutoencoderKL (decoder or full) against a PatchGAN.
The VQ kind (tuneline.models.autoencoder.vq) derives from it: the same units, GAN and perceptual terms.

Two optimization units on the trainer core: "autoencoder" (every step) and "discriminator"
(every `discriminator.every` steps after `discriminator.start`). The autoencoder's loss is
reconstruction (L1/L2) + perceptual (LPIPS, only with local weights) + KL (full mode) + the
adaptive weight times the GAN loss, the weight being the ratio of the gradient norms of the
reconstruction and GAN losses at the decoder's last layer (VQGAN, Esser et al. 2021).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tuneline.models.autoencoder.config import AutoencoderConfig
from tuneline.models.config import ModelConfig
from tuneline.models.loading import vae_source
from tuneline.train.units import ParamGroup, UnitSpec

log = logging.getLogger(__name__)

AUTOENCODER, DISCRIMINATOR = "autoencoder", "discriminator"


def patch_discriminator(layers: int = 3, channels: int = 64) -> Any:
    """PatchGAN (pix2pix / taming's NLayerDiscriminator) with GroupNorm instead of BatchNorm: its
    whole state is parameters, so a checkpoint of the trained parameters resumes it exactly."""
    import torch
    from torch import nn

    blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    width = channels
    for n in range(1, layers + 1):
        out = channels * min(2 ** n, 8)
        stride = 2 if n < layers else 1
        blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(1, out), nn.LeakyReLU(0.2, True)]
        width = out
    blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
    model = nn.Sequential(*blocks)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0.0, 0.02)
    return model


def adaptive_weight(nll_loss: Any, gan_loss: Any, last_layer: Any, disc_weight: float) -> Any:
    """VQGAN's weight of the GAN loss: |grad nll| / (|grad gan| + 1e-4) at `last_layer`, clamped
    to [0, 1e4], times `disc_weight`; detached (a weight, not a path for gradients)."""
    import torch

    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grad) / (torch.norm(gan_grad) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


def discriminator_loss(logits_real: Any, logits_fake: Any, kind: str) -> Any:
    import torch.nn.functional as F

    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def lpips_available() -> str | None:
    """None when LPIPS can run offline (package and its weights on disk), else why not."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None:
        return "the lpips package is not installed"
    weights = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    if not weights.is_file():
        return f"the LPIPS weights are not on disk ({weights})"
    # lpips also loads torchvision's VGG16 trunk, which it would download.
    torch_home = Path.home() / ".cache" / "torch" / "hub" / "checkpoints"
    if not any(torch_home.glob("vgg16-*.pth")):
        return f"the torchvision VGG16 weights are not in {torch_home}"
    return None


def evaluation_forward(network: Any, pixels: Any, forward: Any) -> Any:
    """`forward(pixels)` in eval mode without gradients, on the network's device; clamped to [-1, 1], fp32, on
    the CPU. The network's train/eval mode is put back after."""
    import torch

    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    with torch.no_grad():
        out = forward(pixels.to(device)).float().clamp(-1, 1).cpu()
    network.train(was_training)
    return out


class AutoencoderAdapter:
    """One AutoencoderKL under fine-tuning, with its discriminator."""

    family = "autoencoder_kl"
    compiled_module = "vae"  # the autoencoder section offers no compile (AutoencoderConfig.compile)

    def __init__(self, model_config: ModelConfig, config: AutoencoderConfig, root: Path) -> None:
        self.model_config = model_config
        self.config = config  # the `autoencoder` section
        self.root = Path(root)
        self.vae: Any = None
        self.discriminator: Any = None
        self.perceptual: Any = None
        self.last: dict[str, Any] = {}  # the last step's reconstructions (for tests)

    def load(self, conditioning_cached: bool = False) -> None:
        from tuneline.core.logs import quiet_libraries

        quiet_libraries()
        self.vae = self.build_network()
        if self.config.perceptual == "lpips":
            why = lpips_available()
            if why is not None:
                raise RuntimeError(f"autoencoder.perceptual=lpips: {why}; it is never downloaded at run time. "
                                   "Set autoencoder.perceptual: none, or put the weights there.")
            import lpips

            self.perceptual = lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)

    def build_network(self) -> Any:
        """The network training starts from: the base VAE (model.vae, else model.base's vae/)."""
        from diffusers import AutoencoderKL

        source = vae_source(self.model_config, self.root)
        return AutoencoderKL.from_pretrained(source.location, **source.load_kwargs())

    def freeze(self, network: Any) -> None:
        """Turn off what does not train (after everything was turned on)."""
        if self.config.mode == "decoder":  # latents made by the base encoder stay valid
            network.encoder.requires_grad_(False)
            network.quant_conv.requires_grad_(False)

    def setup_training(self, device: Any = None) -> None:
        self.vae.requires_grad_(True)
        self.freeze(self.vae)
        self.vae.train()
        disc = self.config.discriminator
        self.discriminator = patch_discriminator(disc.layers, disc.channels)

    def trained_modules(self) -> dict[str, Any]:
        return {"vae": self.vae, "discriminator": self.discriminator}

    def frozen_modules(self) -> dict[str, Any]:
        return {"perceptual": self.perceptual} if self.perceptual is not None else {}

    def ema_modules(self) -> list[str]:
        return ["vae"]

    def param_groups(self, modules: dict[str, Any]) -> list[ParamGroup]:
        return [{"params": [p for p in modules["vae"].parameters() if p.requires_grad], "lr": self.config.lr,
                 "name": "vae"}]

    def optimization_units(self, modules: dict[str, Any]) -> list[UnitSpec]:
        disc = self.config.discriminator
        return [
            UnitSpec(AUTOENCODER, self.param_groups(modules), self.config.optimizer, self.config.schedule,
                     self.config.max_grad_norm),
            UnitSpec(DISCRIMINATOR, [{"params": list(modules["discriminator"].parameters()), "lr": disc.lr,
                                      "name": "discriminator"}],
                     disc.optimizer, disc.schedule, disc.max_grad_norm, every=disc.every, start_step=disc.start),
        ]

    def autoencode(self, inner: Any, x: Any, generator: Any, step: int) -> tuple[Any, Any, dict[str, Any]]:
        """(reconstruction of `x`, the regularizer added to the loss or None, its logged terms): the kind's own
        part of a step. KL: a posterior sample decoded; the KL term (trained in full mode only)."""
        import torch

        config = self.config
        with torch.set_grad_enabled(config.mode == "full"):
            posterior = inner.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        reconstruction = inner.decode(z).sample
        # diffusers' kl() sums over the latent's elements; the reconstruction is a mean over pixels.
        # kl_weight is meant on LDM's scale (taming/ldm LPIPSWithDiscriminator: both terms summed per
        # image), so the KL is divided by the pixels per image to keep that ratio (else it weighs
        # 3*H*W times more: at 256 px crops, 1e-6 acts like 0.2).
        kl = posterior.kl().mean() / x[0].numel()
        return reconstruction, config.kl_weight * kl if config.mode == "full" else None, {"kl": kl.detach()}

    def unit_losses(self, modules: dict[str, Any], batch: dict[str, Any], generator: Any, step: int,
                    due: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Losses of the due units at optimizer step `step` (steps done so far) and the logged terms."""
        import torch

        config, disc = self.config, self.config.discriminator
        vae, discriminator = modules["vae"], modules["discriminator"]
        inner = getattr(vae, "module", vae)
        x = batch["pixels"]
        reconstruction, regularizer, terms = self.autoencode(inner, x, generator, step)
        self.last = {"input": x.detach(), "reconstruction": reconstruction.detach()}
        difference = (reconstruction.float() - x.float())
        rec = difference.abs().mean() if config.reconstruction == "l1" else difference.pow(2).mean()
        nll = rec
        extra: dict[str, Any] = {"reconstruction": rec.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(reconstruction.float(), x.float()).mean()
            nll = nll + config.perceptual_weight * perceptual
            extra["perceptual"] = perceptual.detach()
        extra.update(terms)
        loss = nll + regularizer if regularizer is not None else nll
        gan_on = step >= disc.start
        zero = torch.zeros((), device=x.device)
        weight, gan = zero, zero
        losses: dict[str, Any] = {}
        if AUTOENCODER in due:
            if gan_on and disc.weight > 0:
                gan = -discriminator(reconstruction).float().mean()
                weight = adaptive_weight(nll, gan, inner.decoder.conv_out.weight, disc.weight)
                loss = loss + weight * gan
            losses[AUTOENCODER] = loss
        extra.update(gan=gan.detach(), adaptive_weight=weight, disc_factor=torch.tensor(float(gan_on)),
                     disc_start=torch.tensor(float(disc.start)), disc_every=torch.tensor(float(disc.every)),
                     disc_weight=torch.tensor(float(disc.weight)))
        if DISCRIMINATOR in due:
            logits_real = discriminator(x.detach())
            logits_fake = discriminator(reconstruction.detach())
            losses[DISCRIMINATOR] = discriminator_loss(logits_real.float(), logits_fake.float(), disc.loss)
            extra["logits_real"] = logits_real.detach().mean()
            extra["logits_fake"] = logits_fake.detach().mean()
        return losses, extra

    def state_tensors(self, modules: dict[str, Any]) -> dict[str, Any]:
        """Nothing changes outside the optimizer: a KL VAE's whole trained state is its trained parameters."""
        return {}

    def reconstruct(self, network: Any, pixels: Any) -> Any:
        """The VAE's deterministic reconstruction (posterior mode) of a batch in [-1, 1], on the CPU."""
        return evaluation_forward(network, pixels, lambda x: network.decode(network.encode(x).latent_dist.mode()).sample)

    def reference_network(self, seed: int) -> Any:
        """What the trained network is compared with (PSNR/SSIM `base`, the sheets' middle column): the base VAE."""
        from tuneline.models.loading import load_vae

        return load_vae(self.model_config, self.root, "fp32", "cpu")

    def load_output(self, folder: Path) -> Any:
        """The network `save` wrote to `folder`."""
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(folder)

    def save(self, modules: dict[str, Any], out_dir: Path) -> Path:
        """The autoencoder as a diffusers folder: AutoencoderKL (kind kl) or VQModel (kind vq, the same code)."""
        out_dir = Path(out_dir)
        modules["vae"].save_pretrained(out_dir, safe_serialization=True)
        return out_dir
