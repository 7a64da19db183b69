"""The `autoencoder` params section: fine-tuning the VAE with a discriminator on the trainer
core (two optimization units: the autoencoder and the discriminator)."""

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


class AutoencoderConfig(Section):
    """Stage autoencoder: fine-tune the VAE on the bucketed images (optional)."""

    SECTION: ClassVar[str] = "autoencoder"  # its name in params.yaml and in messages
    # What the trainer core reads of a section that the autoencoder does not offer: fixed here.
    compile: ClassVar[bool] = False
    compile_scope: ClassVar[str] = "blocks"
    channels_last: ClassVar[bool] = False

    enabled: bool = Field(False, description="Run the stage; off: a no-op, and latents use model.vae / the base VAE.")
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
        return self
