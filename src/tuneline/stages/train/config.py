"""The `train` params section: what the training stage trains, and how (the trainer core's
units are configured by the sections of `tuneline.train.config`). One section for every model
family: the adapter of model.base's family (sdxl, zimage) reads it, and rejects the settings
that belong to another family when they are set (see each field's description)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, Field, model_validator

from tuneline.core.params import Section
from tuneline.train.config import (CheckpointConfig, EmaConfig, FlowMatchingConfig, LossConfig, OptimizerConfig,
                                   ScheduleConfig)


def _yaml_no(value: Any) -> Any:
    """YAML 1.1 reads an unquoted `no` as false, and tools that rewrite params.yaml
    (`dvc exp run -S`) drop the quotes: false means "no" here."""
    return "no" if value is False else value


class LoraConfig(Section):
    """LoRA adapter settings (PEFT)."""

    rank: int = Field(16, ge=1, description="LoRA rank (dimension of the low-rank update).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    targets: Literal["attention", "attention_mlp", "all"] = Field(
        "attention",
        description="Which denoiser layers get adapters: attention projections (to_q/k/v/out); + feed-forward "
        "layers; all: SDXL + conv layers and other linear layers of the resnets (kohya's 'LoCon'-style coverage), "
        "Z-Image + the blocks' adaLN modulation (every refiner and main block of its transformer, all three).",
    )
    use_dora: bool = Field(
        False,
        description="DoRA (PEFT use_dora): also learn a magnitude per output channel of every adapted layer. "
        "Exported as kohya `dora_scale` (LyCORIS layout, weight decomposition on the output axis).",
    )


class TextEncoderConfig(Section):
    """How one text encoder is trained."""

    mode: Literal["frozen", "lora", "full"] = Field("frozen", description="frozen, LoRA adapters, or full training.")
    lr: Optional[float] = Field(None, gt=0, description="Learning rate; null uses train.lr.")


class TrainConfig(Section):
    """Stage train: the trainer core with the adapter of the model's family (SDXL, Z-Image)."""

    mode: Literal["lora", "full"] = Field(
        "lora", description="Train LoRA adapters on the denoiser (SDXL's UNet, Z-Image's transformer), or all of it.")
    seed: Optional[int] = Field(
        42, description="Seed of everything; null or 0 picks a random seed and records it so the run can be repeated."
    )
    num_steps: Optional[int] = Field(100, ge=1, description="Stop after this many optimizer steps.")
    num_epochs: Optional[int] = Field(None, ge=1, description="Stop after this many epochs (when num_steps is null).")
    lr: float = Field(1e-4, gt=0, description="Learning rate of the UNet (and text encoders without their own).")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    mixed_precision: Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(_yaml_no)] = Field(
        "no",
        description="Autocast precision; fp16 uses a gradient scaler. Use bf16 on recent GPUs. Under bf16/fp16 the "
        "frozen weights (the LoRA base, frozen text encoders) are held in that dtype; trained parameters, gradients "
        "and optimizer state stay fp32.",
    )
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping norm; null disables it.")
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = Field(
        None, description="SDXL: training target; null takes it from the model's scheduler config. (Z-Image: "
        "always the flow-matching velocity; must stay null.)"
    )
    zero_terminal_snr: bool = Field(
        False, description="SDXL: rescale the noise schedule to zero terminal SNR. (Z-Image: must stay false.)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (mode lora, and lora text encoders).")
    text_encoder_1: TextEncoderConfig = Field(
        default_factory=TextEncoderConfig,
        description="SDXL: the CLIP ViT-L text encoder. (Z-Image's Qwen3 text encoder is always frozen: must stay "
        "at its defaults.)")
    text_encoder_2: TextEncoderConfig = Field(
        default_factory=TextEncoderConfig,
        description="SDXL: the OpenCLIP bigG text encoder. (Z-Image has none: must stay at its defaults.)")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Learning-rate schedule.")
    loss: LossConfig = Field(
        default_factory=LossConfig,
        description="SDXL's loss weighting (min-SNR, noise offset, min sigma); Z-Image uses train.flow_matching and "
        "rejects these when set.")
    flow_matching: FlowMatchingConfig = Field(
        default_factory=FlowMatchingConfig,
        description="Flow-matching families (Z-Image): how each sample's noise level is drawn and shifted, and the "
        "loss weighting by noise level. SDXL (DDPM) rejects these when set to anything but the defaults.")
    ema: EmaConfig = Field(default_factory=EmaConfig, description="EMA of the trained weights.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="Probability of training a sample on the empty caption.")
    caption_shuffle: bool = Field(False, description="Shuffle caption tags (split on caption_separator) every step.")
    caption_separator: str = Field(",", min_length=1, description="Tag separator for caption_shuffle.")
    keep_tokens: int = Field(1, ge=0, description="caption_shuffle keeps the first N tags in place (trigger word).")
    shuffle_min_tokens: int = Field(2, ge=0, description="Captions with fewer tags than this are never shuffled.")
    flip: bool = Field(False, description="Random horizontal flip (needs latents.flip: the flipped latent is cached).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel: torch SDPA or the plain one (SDXL only; Z-Image: sdpa).")
    compile: bool = Field(
        False, description="torch.compile the denoiser (SDXL's UNet, Z-Image's transformer; the first step waits "
        "for the compiler, later steps are faster)."
    )
    compile_scope: Literal["blocks", "model"] = Field(
        "blocks",
        description="With compile: 'blocks' compiles the UNet's repeated transformer blocks (diffusers' "
        "compile_repeated_blocks: one trace reused by every block, a first step in seconds); 'model' compiles the "
        "whole UNet at once (minutes before the first step at SDXL size).",
    )
    channels_last: bool = Field(
        False,
        description="Keep the trained modules' 4-D weights in channels-last memory format (can speed up "
        "convolutions on GPUs; off until measured to help, see bench/gpu.py).",
    )
    log_every: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")

    @model_validator(mode="after")
    def _stop_rule(self) -> "TrainConfig":
        if self.num_steps is None and self.num_epochs is None:
            raise ValueError("set train.num_steps or train.num_epochs")
        return self

    @property
    def train_text_encoders(self) -> bool:
        return self.text_encoder_1.mode != "frozen" or self.text_encoder_2.mode != "frozen"
