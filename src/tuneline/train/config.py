"""Settings of the trainer core's own units: optimizer, LR schedule, loss weighting, EMA and
checkpoints. Plain pydantic, no torch: validation stays instant. A training stage composes
them into its params section (`TrainConfig`, below)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BeforeValidator, Field, model_validator

from tuneline.core.params import Section


class OptimizerConfig(Section):
    """The optimizer."""

    name: Literal["adamw", "adamw8bit", "lion", "adafactor", "prodigy"] = Field(
        "adamw",
        description="adamw (torch), adamw8bit (bitsandbytes, CUDA), lion (lion-pytorch), adafactor "
        "(transformers), prodigy (prodigyopt; use lr 1.0).",
    )
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/Lion/Prodigy betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")


class ScheduleConfig(Section):
    """The learning-rate schedule: a factor of train.lr per optimizer step."""

    name: Literal["constant", "linear", "cosine", "cosine_with_restarts"] = Field(
        "constant", description="Shape after warmup: constant, linear decay, cosine decay, cosine with restarts."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 over this many optimizer steps.")
    min_factor: float = Field(0.0, ge=0, le=1, description="Lowest factor the decay reaches (fraction of lr).")
    cycle_steps: Optional[int] = Field(
        None, ge=1, description="cosine_with_restarts: length of the first cycle; null splits the run in 4."
    )
    cycle_mult: float = Field(1.0, ge=1, description="cosine_with_restarts: each cycle is this many times longer.")


# The style/structure loss terms, in the order their weights travel (a data set's weights, a batch's
# per-sample weight rows, tuneline.train.structure_loss's term columns).
STRUCTURE_TERMS = ("struct", "light", "color", "tex")
_STRUCTURE_FIELD = {"ge": 0, "allow_inf_nan": False}


class StructureConfig(Section):
    """Weights of the style/structure loss (the Z-Image trainer's StyleStructureLoss, see
    tuneline.train.structure_loss): terms on the predicted clean latent against the clean latent,
    projected to approximate RGB through the family's latent->RGB factors and converted to Lab.
    Each term is added to a sample's loss times its weight; 0 leaves the term out (all 0: the loss
    and the run are exactly as without it)."""

    struct: float = Field(
        0.0, **_STRUCTURE_FIELD,
        description="1 - SSIM of the lightness L (Gaussian window 11, sigma 1.5): keeps contours.")
    light: float = Field(
        0.0, **_STRUCTURE_FIELD,
        description="L1 between the mean and the standard deviation of L: brightness, contrast, tone curve.")
    color: float = Field(
        0.0, **_STRUCTURE_FIELD,
        description="The same statistics on the colour channels a and b: colour cast and saturation.")
    tex: float = Field(
        0.0, **_STRUCTURE_FIELD,
        description="L1 of the high-pass of L (L minus its Gaussian blur, kernel 7): sharpness and grain.")

    @property
    def weights(self) -> tuple[float, float, float, float]:
        """The weights in STRUCTURE_TERMS order."""
        return (self.struct, self.light, self.color, self.tex)


class StructureOverrides(Section):
    """A data set's own style/structure weights: each term it sets replaces train.loss.structure's
    for its samples; a term it leaves unset (null) takes train.loss.structure's value."""

    struct: Optional[float] = Field(None, **_STRUCTURE_FIELD,
                                    description="1 - SSIM of L; null: train.loss.structure.struct.")
    light: Optional[float] = Field(None, **_STRUCTURE_FIELD,
                                   description="Moments of L; null: train.loss.structure.light.")
    color: Optional[float] = Field(None, **_STRUCTURE_FIELD,
                                   description="Moments of a and b; null: train.loss.structure.color.")
    tex: Optional[float] = Field(None, **_STRUCTURE_FIELD,
                                 description="High-pass of L; null: train.loss.structure.tex.")

    def over(self, base: StructureConfig) -> StructureConfig:
        """`base` (train.loss.structure) with the terms set here replaced."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


class DatasetLossConfig(Section):
    """A data set's own loss settings."""

    structure: StructureOverrides = Field(
        default_factory=StructureOverrides,
        description="Its style/structure weights {struct, light, color, tex}: the terms set here replace "
        "train.loss.structure's for its samples, the others keep train.loss.structure's values.")


class LossConfig(Section):
    """The diffusion loss: its per-element form (type, with the Huber threshold's schedule) and weighting."""

    # The settings any objective takes (DDPM and flow matching); the others weigh by the DDPM noise schedule.
    EVERY_OBJECTIVE: ClassVar[tuple[str, ...]] = ("type", "huber_c", "huber_schedule", "structure")

    type: Literal["l2", "huber", "smooth_l1"] = Field(
        "l2",
        description="Per-element loss of prediction vs target (kohya sd-scripts' --loss_type): l2 squared error; "
        "huber the pseudo-Huber 2c(sqrt(r^2 + c^2) - c) (r^2 near 0, 2c|r| far out); smooth_l1 the same without "
        "the factor c, 2(sqrt(r^2 + c^2) - c). Both are less pulled by outlier pixels than l2.",
    )
    huber_c: float = Field(
        0.1,
        gt=0,
        allow_inf_nan=False,
        description="huber / smooth_l1: the threshold c at full noise (constant: at every noise level); the "
        "exponential and snr schedules go from 1 at the clean end to huber_c, so they take 0 < huber_c <= 1.",
    )
    huber_schedule: Literal["constant", "exponential", "snr"] = Field(
        "snr",
        description="huber / smooth_l1: c per sample from its noise level (sd-scripts' --huber_schedule): constant "
        "huber_c; exponential huber_c^(t/T) (flow matching: huber_c^sigma); snr (1 - huber_c)/(1 + s)^2 + huber_c "
        "with s = sqrt((1 - alpha_bar)/alpha_bar) = 1/sqrt(SNR) (flow matching: s = sigma/(1 - sigma), the same "
        "SNR, i.e. huber_c + (1 - huber_c)(1 - sigma)^2).",
    )
    min_snr_gamma: Optional[float] = Field(
        None, gt=0, description="Min-SNR-gamma weighting (5 is common); null: plain MSE."
    )
    noise_offset: float = Field(0.0, ge=0, description="Noise offset (0.0357 is common); 0 disables it.")
    min_sigma: Optional[float] = Field(
        None,
        gt=0,
        description="Minimum-sigma weighting: samples with noise level sigma below this get weight sigma/min_sigma, "
        "so near-clean timesteps do not dominate; null disables it.",
    )
    min_sigma_warmup_steps: int = Field(
        0, ge=0, description="Ramp min_sigma in linearly from 0 over this many steps."
    )
    structure: StructureConfig = Field(
        default_factory=StructureConfig,
        description="Style/structure loss weights {struct, light, color, tex} (both families; all 0: off), "
        "for every data set; datasets[].loss.structure overrides them per data set, term by term.")

    @model_validator(mode="after")
    def _decaying_threshold(self) -> "LossConfig":
        if self.type != "l2" and self.huber_schedule != "constant" and self.huber_c > 1:
            raise ValueError(
                f"huber_c: {self.huber_c} with huber_schedule {self.huber_schedule!r} would make the threshold grow "
                "with the noise (the schedule goes from 1 at the clean end to huber_c); allowed: 0 < huber_c <= 1, "
                "or huber_schedule 'constant'")
        return self


def _parse_shift(value: Any) -> Any:
    """'auto' or a number > 0 (YAML may hand numbers over as strings)."""
    if value == "auto":
        return value
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not number > 0:
        raise ValueError("expected 'auto' (the pipeline scheduler's shift for the resolution) or a number > 0")
    return number


Shift = Annotated[Union[Literal["auto"], float], BeforeValidator(_parse_shift)]


class FlowMatchingConfig(Section):
    """Noise levels and loss weighting of a flow-matching model (Z-Image, Flux): see
    `tuneline.train.flow_matching`."""

    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = Field(
        "logit_normal",
        description="How each sample's noise level sigma is drawn before the shift: uniform in [0, 1], "
        "logit_normal (sigmoid of a normal with logit_mean, logit_std), or mode (SD3's mode sampling, "
        "mode_scale).",
    )
    logit_mean: float = Field(0.0, description="logit_normal: mean of the normal; > 0 leans towards noise.")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: standard deviation of the normal.")
    mode_scale: float = Field(1.29, description="mode: scale; > 0 puts more samples at middle noise levels.")
    shift: Shift = Field(
        "auto",
        description="Shift of the drawn sigmas towards noise: 'auto' uses the shift the model's scheduler "
        "uses at inference (its static shift, or the resolution-dependent one when use_dynamic_shifting), "
        "a number a static shift s*sigma/(1+(s-1)*sigma); 1.0 none.",
    )
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none",
        description="Per-sample loss weight from sigma (SD3): none, sigma_sqrt (sigma^-2), cosmap.",
    )


class EmaConfig(Section):
    """Exponential moving average of the trained weights."""

    enabled: bool = Field(False, description="Keep an EMA copy of the trained weights.")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per update.")
    warmup: bool = Field(
        True,
        description="Ramp the decay in as min(decay, (1+n)/(10+n)), n = updates so far, so the average "
        "follows the weights closely early on (diffusers' default).",
    )
    every: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")
    start_step: int = Field(0, ge=0, description="Start averaging after this many optimizer steps (e.g. warmup).")
    on_cpu: bool = Field(False, description="Keep the EMA weights on the CPU to save GPU memory.")


class MaskedLossConfig(Section):
    """Masked loss: each latent position's loss is weighted by the item's mask (its alpha channel or a
    `<stem>_mask.png` beside it, white = train, black = ignore) before the per-sample mean."""

    enabled: bool = Field(False, description="Weight the per-pixel loss by each item's mask (items without one "
                          "train everywhere).")
    unmasked_weight: float = Field(
        0.0, ge=0, le=1,
        description="Floor of the weight: each position counts max(mask, unmasked_weight); 0 ignores the "
        "masked-out area, 1 is the unmasked loss.")
    normalize: bool = Field(
        True, description="Divide each sample's loss by its weights' mean, so a small subject is not "
        "down-weighted against a large one (sd-scripts / OneTrainer normalize_masked_area_loss).")


class CheckpointConfig(Section):
    """When and how many resumable checkpoints are kept."""

    every_steps: Optional[int] = Field(50, ge=1, description="Save every N optimizer steps; null: never by steps.")
    every_epochs: Optional[int] = Field(None, ge=1, description="Save every N epochs; null: never by epochs.")
    keep_last: int = Field(2, ge=1, description="Keep this many most recent checkpoints.")


class ValidationConfig(Section):
    """The held-out loss: the training loss of the validation items (datasets[].validation) at fixed
    noise levels and fixed noise, so it moves only when the weights do (kohya sd-scripts' validation,
    SimpleTuner's eval loss). Computing it leaves training as it was: safe to change on resume."""

    every_steps: int = Field(
        0, ge=0, description="Compute the validation loss every N optimizer steps and on the last step; 0 turns it "
        "off. A step whose loss is the lowest so far is checkpointed and kept (models/train/best/).")
    points: int = Field(
        4, ge=1, le=64, description="With timesteps null: evaluate at this many noise levels evenly spaced across the "
        "schedule, t_k = 1000 * k / (points + 1), k = 1..points (4: 200, 400, 600, 800).")
    timesteps: Optional[list[int]] = Field(
        None, description="The noise levels to evaluate at, as training timesteps 1..999: the DDPM timestep for SDXL, "
        "sigma = t / 1000 for flow-matching families (Z-Image; unshifted: the level itself). null: `points` levels "
        "evenly spaced.")
    seed: int = Field(0, ge=0, description="Seed of the fixed noise: each item's noise is drawn from (seed, item id).")

    @model_validator(mode="after")
    def _levels(self) -> "ValidationConfig":
        for step in self.timesteps or []:
            if not 1 <= step <= 999:
                raise ValueError(f"timesteps: {step} is outside 1..999")
        if self.timesteps is not None and (not self.timesteps or len(set(self.timesteps)) != len(self.timesteps)):
            raise ValueError(f"timesteps: {self.timesteps} must be distinct and not empty")
        return self

    def levels(self) -> list[int]:
        """The timesteps to evaluate at, ascending."""
        if self.timesteps is not None:
            return sorted(self.timesteps)
        return [round(1000 * k / (self.points + 1)) for k in range(1, self.points + 1)]


# --- the `train` params section: what the training stage trains, and how --------------------

def _yaml_no(value: Any) -> Any:
    """YAML 1.1 reads an unquoted `no` as false, and tools that rewrite params.yaml
    (`dvc exp run -S`) drop the quotes: false means "no" here."""
    return "no" if value is False else value


ADAPTER_TYPES = ("lora", "loha", "lokr")


class LoraConfig(Section):
    """The low-rank adapter (PEFT): LoRA, or one of LyCORIS' LoHa and LoKr (PEFT's LoHaConfig / LoKrConfig).
    rank, alpha and targets apply to all three; each scales its update by alpha / rank."""

    type: Literal["lora", "loha", "lokr"] = Field(
        "lora",
        description="lora: up @ down. loha (LyCORIS LoHa): the Hadamard product of two rank-`rank` products, "
        "(w1a @ w1b) * (w2a @ w2b), rank up to rank^2 for twice LoRA's parameters. lokr (LyCORIS LoKr): the "
        "Kronecker product w1 (x) w2 of a small full matrix and a rank-`rank` product (full when rank >= half "
        "its larger side), split by `factor`. Exported in LyCORIS' keys (hada_*, lokr_*).",
    )
    rank: int = Field(16, ge=1, description="Rank (dimension of the low-rank factors).")
    alpha: float = Field(16.0, gt=0, description="Alpha; the update is scaled by alpha/rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch (type lora only).")
    targets: Literal["attention", "attention_mlp", "all"] = Field(
        "attention",
        description="Which denoiser layers get adapters: attention projections (to_q/k/v/out); + feed-forward "
        "layers; all: SDXL + conv layers and other linear layers of the resnets (kohya's 'LoCon'-style coverage), "
        "Z-Image + the blocks' adaLN modulation (every refiner and main block of its transformer, all three).",
    )
    use_dora: bool = Field(
        False,
        description="DoRA (PEFT use_dora): also learn a magnitude per output channel of every adapted layer. "
        "Exported as kohya `dora_scale` (LyCORIS layout, weight decomposition on the output axis). Type lora only.",
    )
    factor: int = Field(
        -1,
        description="lokr: how each side of a weight splits into w1's and w2's (LyCORIS/PEFT decompose_factor): "
        "-1 the most balanced split (640 -> 20 x 32), N > 0 a split with N on w1's side (640, 4 -> 4 x 160).",
    )
    decompose_both: bool = Field(
        False, description="lokr: also factor w1 into a rank-`rank` product (when rank < half its larger side).")

    @model_validator(mode="after")
    def _type_settings(self) -> "LoraConfig":
        problems = []
        if self.type != "lora":
            if self.use_dora:
                problems.append(f"use_dora: true applies to type 'lora' only (PEFT's LoHa and LoKr have no DoRA); "
                                f"allowed with type {self.type!r}: false")
            if self.dropout:
                problems.append(f"dropout: {self.dropout} applies to type 'lora' only (PEFT's LoHa and LoKr have no "
                                f"dropout on their input); allowed with type {self.type!r}: 0.0")
        if self.type != "lokr":
            if self.factor != -1:
                problems.append(f"factor: {self.factor} applies to type 'lokr' only; allowed with type "
                                f"{self.type!r}: -1 (the default)")
            if self.decompose_both:
                problems.append(f"decompose_both: true applies to type 'lokr' only; allowed with type "
                                f"{self.type!r}: false")
        if self.factor == 0 or self.factor < -1:
            problems.append(f"factor: {self.factor}; allowed: -1 (balanced) or a number >= 1")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TextEncoderConfig(Section):
    """How one text encoder is trained."""

    mode: Literal["frozen", "lora", "full"] = Field("frozen", description="frozen, LoRA adapters, or full training.")
    lr: Optional[float] = Field(None, gt=0, description="Learning rate; null uses train.lr.")


class TrainConfig(Section):
    """Stage train: the trainer core with the adapter of the model's family (SDXL, Z-Image)."""

    SECTION: ClassVar[str] = "train"  # its name in params.yaml and in messages

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
        description="SDXL's loss weighting (min-SNR, noise offset, min sigma; Z-Image uses train.flow_matching and "
        "rejects these when set), and the style/structure loss of both families (structure).")
    flow_matching: FlowMatchingConfig = Field(
        default_factory=FlowMatchingConfig,
        description="Flow-matching families (Z-Image): how each sample's noise level is drawn and shifted, and the "
        "loss weighting by noise level. SDXL (DDPM) rejects these when set to anything but the defaults.")
    ema: EmaConfig = Field(default_factory=EmaConfig, description="EMA of the trained weights.")
    masked_loss: MaskedLossConfig = Field(
        default_factory=MaskedLossConfig,
        description="Masked loss from each item's alpha channel or `<stem>_mask.png` (off by default).")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig,
        description="The validation loss on the held-out items (datasets[].validation) and the best checkpoint.")
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
