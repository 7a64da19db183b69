"""The autoencoder kind (beside the diffusion families), one model object per `autoencoder.kind`:

- kl: a KL VAE (diffusers AutoencoderKL) fine-tuned against a PatchGAN; the stages that encode or
  decode (latents, train, render, export) then use it as model.vae (`adapter.AutoencoderAdapter`).
- vq: a VQ autoencoder (diffusers VQModel) with a codebook updated by EMA, trained against the same
  PatchGAN; a deliverable of its own, which no diffusion family can use as its VAE (`vq.VQAdapter`).

The stage asks the kind's object (its adapter: load, losses, the network it writes and how it
reconstructs); it does not branch on the kind's name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AutoencoderKind:
    """One value of `autoencoder.kind`."""

    name: str  # autoencoder.kind
    adapter: str  # "module:Class" of its trainer adapter
    network: str  # what it writes to models/autoencoder, in words
    is_latent_vae: bool  # its output can be a diffusion family's model.vae (latents, train, render, export)
    reference: str  # what its PSNR/SSIM `base` and the sheets' middle column are (adapter.reference_network)
    warning: str | None = None  # what the stage says whenever it trains this kind

    @property
    def registry_name(self) -> str:
        """Its name in tuneline.models.registry (beside the family names)."""
        return f"autoencoder_{self.name}"


KINDS: dict[str, AutoencoderKind] = {kind.name: kind for kind in (
    AutoencoderKind("kl", "tuneline.models.autoencoder.adapter:AutoencoderAdapter", "a diffusers AutoencoderKL", True,
                    "the base VAE (model.vae, else model.base's vae/)"),
    AutoencoderKind("vq", "tuneline.models.autoencoder.vq:VQAdapter", "a diffusers VQModel", False,
                    "the RANDOM VQ model training started from (the run's seed)",
                    "autoencoder.kind is vq: the VQ model starts RANDOM (the base VAE's shapes, not its weights), and "
                    "its base PSNR/SSIM are those of that random start; it is a deliverable of its own, which latents, "
                    "train, render and export cannot use as model.vae"),
)}

ADAPTER = KINDS["kl"].adapter  # the KL adapter (the kind every run before `autoencoder.kind` trained)


def autoencoder_kind(name: str) -> AutoencoderKind:
    """The kind called `name`; KeyError naming the kinds otherwise."""
    if name not in KINDS:
        raise KeyError(f"no autoencoder kind {name!r}; kinds: {', '.join(KINDS)}")
    return KINDS[name]


def latent_vae_problem(enabled: bool, kind: str) -> str | None:
    """Why the stages that encode or decode (latents, train, render, export) cannot use the autoencoder
    stage's output as model.vae, or None when they can (the stage off, or a kind that makes a KL VAE)."""
    chosen = autoencoder_kind(kind)
    if not enabled or chosen.is_latent_vae:
        return None
    usable = ", ".join(name for name, k in KINDS.items() if k.is_latent_vae)
    return (f"autoencoder.kind: {kind} trains a VQ model, a deliverable of its own; the latents stage needs a KL VAE: "
            f"with autoencoder.enabled: true and kind: {kind}, models/autoencoder holds {chosen.network}, which "
            "latents, train, render and export cannot use as model.vae. Train it alone (`tuneline autoencoder` or "
            f"`dvc repro autoencoder`); to run the diffusion stages set autoencoder.kind: {usable} (a fine-tuned KL "
            "VAE) or autoencoder.enabled: false (model.vae / the base VAE)")
