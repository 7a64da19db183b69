"""The `autoencoder` params section: fine-tuning the VAE (kind kl) or training a VQ autoencoder with an
EMA codebook (kind vq) with a discriminator on the trainer core (two optimization units: the
autoencoder and the discriminator)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

from pydantic import BeforeValidator, Field, model_validator

from tuneline.core.params import Section
from tuneline.train.config import _yaml_no
from tuneline.train.config import CheckpointConfig, EmaConfig, OptimizerConfig, ScheduleConfig


class DiscriminatorConfig(Section):
    """The PatchGAN discriminator and its optimization unit."""

    # Half of the default run (num_steps 1000): reconstruction settles first, then the GAN refines.
    # (It was 2000, so a default run never trained or used the discriminator.)
    start: int = Field(
        500, ge=0, description="disc_start: the discriminator steps, and the GAN loss counts, only after this step.")
    every: int = Field(3, ge=1, description="disc_every: step the discriminator every N optimizer steps.")
    weight: float = Field(0.5, ge=0, description="disc_weight: factor on the adaptive weight of the GAN loss.")
    loss: Literal["hinge", "vanilla"] = Field("hinge", description="Discriminator loss: hinge or vanilla (BCE).")
    layers: int = Field(3, ge=1, le=5, description="PatchGAN depth (stride-2 convolutions).")
    channels: int = Field(64, ge=4, description="Channels of the first PatchGAN layer.")
    lr: float = Field(1e-4, gt=0, description="Learning rate of the discriminator.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping of the discriminator; null: none.")
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(betas=(0.5, 0.9), weight_decay=0.0),
                                       description="Optimizer of the discriminator.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="LR schedule of the discriminator.")


class VQConfig(Section):
    """kind vq: the vector quantizer of the VQModel and the EMA update of its codebook (taming's EMAVQ)."""

    codebook_size: int = Field(1024, ge=2, le=65536, description="Codes in the codebook (num_vq_embeddings).")
    embedding_dim: Optional[int] = Field(
        None, ge=1, le=1024, description="Dimension of each code (vq_embed_dim); null: the latent channels of the "
        "base VAE the network's shapes come from.")
    beta: float = Field(0.25, ge=0, description="Weight of the commitment loss beta * |z_e - sg(z_q)|^2 (taming: 0.25).")
    decay: float = Field(0.99, gt=0, lt=1, description="EMA decay of the codebook's cluster sizes and embedding sums.")
    epsilon: float = Field(1e-5, gt=0, description="Laplace smoothing of the cluster sizes (taming, VQ-VAE-2: 1e-5).")
    dead_code_threshold: float = Field(
        0.0, ge=0, description="Restart a code from a random encoding of the current batch when its EMA cluster size "
        "(encodings per step, averaged over about 1/(1-decay) steps) falls below this; 0: never (taming's EMAVQ).")
    usage_window: int = Field(100, ge=1, description="Steps over which codebook usage (the share of codes used at "
                              "least once) is measured and logged.")


class AutoencoderConfig(Section):
    """Stage autoencoder: fine-tune the VAE on the bucketed images (optional)."""

    SECTION: ClassVar[str] = "autoencoder"  # its name in params.yaml and in messages
    # What the trainer core reads of a section that the autoencoder does not offer: fixed here.
    compile: ClassVar[bool] = False
    compile_scope: ClassVar[str] = "blocks"
    channels_last: ClassVar[bool] = False

    enabled: bool = Field(False, description="Run the stage; off: a no-op, and latents use model.vae / the base VAE.")
    kind: Literal["kl", "vq"] = Field(
        "kl", description="kl: fine-tune the KL VAE (AutoencoderKL) that latents, train, render and export then use; "
        "vq: train a VQ autoencoder (diffusers VQModel, RANDOM at start, shaped like the base VAE) with an EMA "
        "codebook, a deliverable of its own that the diffusion stages cannot use.")
    mode: Literal["decoder", "full"] = Field(
        "decoder", description="decoder: the encoder is frozen (existing latents stay valid); full: both.")
    crop_size: int = Field(256, ge=16, description="Side of the square random crops trained on (multiple of 8).")
    batch_size: int = Field(4, ge=1, description="Crops per batch (all from one bucket).")
    holdout: int = Field(1, ge=0, description="Images per data set held out of training for PSNR/SSIM.")
    seed: Optional[int] = Field(42, description="Seed of everything; null or 0 picks one and records it.")
    num_steps: Optional[int] = Field(1000, ge=1, description="Stop after this many optimizer steps.")
    num_epochs: Optional[int] = Field(None, ge=1, description="Stop after this many epochs (when num_steps is null).")
    lr: float = Field(1e-5, gt=0, description="Learning rate of the autoencoder.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    # No fp16: accelerate's GradScaler wrapper updates the scale inside every optimizer's step and
    # unscales every optimizer when one unit clips, which is wrong with two optimizers stepping on one
    # scaled backward (and the SDXL VAE overflows in fp16 anyway). bf16 needs no scaler.
    mixed_precision: Annotated[Literal["no", "bf16"], BeforeValidator(_yaml_no)] = Field(
        "no", description="Autocast precision: no or bf16 (fp16 is not offered: two optimizers under one "
        "gradient scaler, and the SDXL VAE overflows in fp16).")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping of the autoencoder; null: none.")
    reconstruction: Literal["l1", "l2"] = Field("l1", description="Pixel reconstruction loss.")
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the KL term (full mode), on LDM's scale: KL summed "
                             "over the latent against the reconstruction summed over the pixels, per image.")
    perceptual: Literal["none", "lpips"] = Field(
        "none", description="Perceptual loss: lpips (the `lpips` package, only with its weights present locally; "
        "never downloaded) or none.")
    perceptual_weight: float = Field(1.0, ge=0, description="Weight of the perceptual loss.")
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig, description="The discriminator.")
    vq: VQConfig = Field(default_factory=VQConfig, description="kind vq: the quantizer and its EMA codebook.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer of the autoencoder.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="LR schedule of the autoencoder.")
    ema: EmaConfig = Field(default_factory=EmaConfig, description="EMA of the autoencoder (not the discriminator).")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    eval_every: int = Field(100, ge=1, description="PSNR/SSIM on the held-out images every N steps (and at the end).")
    log_every: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")

    @model_validator(mode="after")
    def _rules(self) -> "AutoencoderConfig":
        if self.num_steps is None and self.num_epochs is None:
            raise ValueError("set autoencoder.num_steps or autoencoder.num_epochs")
        if self.crop_size % 8:
            raise ValueError(f"autoencoder.crop_size must be a multiple of 8 (the VAE's factor), got {self.crop_size}")
        if self.kind == "vq" and self.mode == "decoder":
            raise ValueError("autoencoder.mode: 'decoder' freezes the encoder, and autoencoder.kind: 'vq' builds a "
                             "RANDOM VQ model whose encoder must train: set autoencoder.mode: full (allowed with vq: "
                             "'full')")
        return self
