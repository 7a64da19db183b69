"""The SDXL adapter: everything the trainer core needs that is specific to SDXL.

Loads the UNet, the text encoders (only when a step needs them: not when the latents
stage cached the text embeddings) and the noise schedule; applies the training mode
(LoRA, LoHa or LoKr through PEFT, or full, per component); holds frozen weights in the compute dtype
of mixed precision while trained parameters stay fp32; turns a batch of cached latents
and captions into the per-sample diffusion loss (text conditioning, time ids from
original size / crop / target size, epsilon or v target); saves the result in diffusers
format.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tuneline.core.device import cast_frozen, compute_dtype_name, torch_dtype
from tuneline.core.logs import quiet_libraries
from tuneline.core.params import ParamsError
from tuneline.core.tensorfile import canonicalize
from tuneline.models.config import ModelConfig
from tuneline.models.loading import _base_location, host_to_device, load_text_encoders, load_vae
from tuneline.models.lycoris import adapter_settings, peft_config, trained_state_dict
from tuneline.models.lycoris import refuse as refuse_lycoris
from tuneline.models.quantize import keep_trained_fp32, quantize_frozen, refuse_full_training
from tuneline.models.sdxl import FAMILY
from tuneline.models.training_adapter import load_training_adapter
from tuneline.models.sdxl.text import MAX_TOKENS, conditioning_layers, encode_prompts
from tuneline.train.units import MODEL_UNIT, ParamGroup, UnitSpec, model_unit
from tuneline.train.config import TrainConfig
from tuneline.train.loss import (ddpm_noise_levels, ddpm_x0, loss_weights, mask_weights, per_sample_loss_and_mse,
                                 snr_of)
from tuneline.train.output import LORA_FILE, PIPELINE_DIR
from tuneline.train.prior import loss_split, with_prior_targets
from tuneline.train.structure_loss import LatentRGB, with_structure

log = logging.getLogger(__name__)


# PEFT target modules per preset (suffix match on module names).
UNET_LORA_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention_mlp": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
            "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"],
}
TEXT_LORA_TARGETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attention_mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
TEXT_ENCODER_NAMES = ("text_encoder_1", "text_encoder_2")  # params names; diffusers: text_encoder, text_encoder_2
DIFFUSERS_NAMES = {"unet": "unet", "text_encoder_1": "text_encoder", "text_encoder_2": "text_encoder_2"}
LATENT_FACTOR = 8  # SDXL's VAE: latents are 1/8 of the image in each direction
# ComfyUI's Latent2RGB preview factors of SDXL latents: comfy/latent_formats.py, class SDXL, latent_rgb_factors and
# latent_rgb_factors_bias (github.com/comfyanonymous/ComfyUI, commit 040a3243). Its previewer projects the sampler's
# x0, which is in the model's space (KSampler runs on process_latent_in(latent) = z * 0.13025 and converts back only
# at the end): the scaled latents our batches hold, so no un-scaling comes first.
LATENT_RGB = LatentRGB(
    factors=((0.3651, 0.4232, 0.4341),
             (-0.2533, -0.0042, 0.1068),
             (0.1076, 0.1111, -0.0362),
             (-0.3165, -0.2492, -0.2188)),
    bias=(0.1084, -0.0175, -0.0011),
    source="ComfyUI comfy/latent_formats.py SDXL.latent_rgb_factors and latent_rgb_factors_bias")


def inference_scheduler_settings(prediction_type: str, zero_terminal_snr: bool) -> dict[str, Any]:
    """Scheduler config entries that make an inference pipeline sample what training learned: the
    target, and with zero terminal SNR the rescaled betas and trailing timesteps (the first step
    then starts from pure noise, as in training)."""
    settings: dict[str, Any] = {"prediction_type": prediction_type}
    if zero_terminal_snr:
        settings |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return settings


class SDXLAdapter:
    """One SDXL model under training. Modules are plain torch modules until the trainer prepares them."""

    family = "sdxl"
    compiled_module = "unet"  # the module train.compile compiles
    latent_rgb = LATENT_RGB  # the style/structure loss's projection (train.loss.structure)

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, root: Path) -> None:
        FAMILY.refuse_unsupported(train_config)  # also checked before any stage computes (tuneline.preflight)
        refuse_full_training(model_config.quantize, train_config)
        refuse_lycoris(model_config.quantize, train_config)  # also checked by tuneline check
        self.model_config = model_config
        self.config = train_config
        self.root = Path(root)
        self.unet: Any = None
        self.tokenizers: list[Any] = []
        self.text_encoders: list[Any] = []
        self.noise_scheduler: Any = None
        self.prediction_type = "epsilon"
        # load(conditioning_cached=True) leaves the text encoders out; inference loads them later.
        self.text_encoders_loaded_for_inference = False

    @property
    def compute_dtype(self) -> str:
        return compute_dtype_name(self.config.mixed_precision)

    # --- loading and set-up -----------------------------------------------------------

    def needs_text_encoders(self, conditioning_cached: bool) -> bool:
        """Whether a training step runs a text encoder: one is trained, or the embeddings are not cached."""
        return self.config.train_text_encoders or not conditioning_cached

    def load(self, conditioning_cached: bool = False, empty_weights: bool = False) -> None:
        """The UNet, the noise schedule and, when a step needs them, the tokenizers and text encoders.

        `conditioning_cached`: every batch carries the text embeddings (the latents stage cached
        them), so frozen text encoders are not loaded at all. `empty_weights`: build every module
        from its config on the meta device (shapes and dtypes, no memory): the memory estimate.
        """
        quiet_libraries()  # before the import: it warns while importing
        from diffusers import DDPMScheduler, UNet2DConditionModel

        base = _base_location(self.model_config, self.root)
        kwargs = {"revision": self.model_config.revision} if isinstance(base, str) and self.model_config.revision else {}
        if empty_weights:
            from accelerate import init_empty_weights

            with init_empty_weights():
                self.unet = UNet2DConditionModel.from_config(
                    UNet2DConditionModel.load_config(base, subfolder="unet", **kwargs))
        else:
            self.unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kwargs)
        # Training always uses the DDPM forward process, whatever sampler the folder ships.
        scheduler_overrides = {"rescale_betas_zero_snr": True} if self.config.zero_terminal_snr else {}
        self.noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kwargs,
                                                             **scheduler_overrides)
        configured = self.noise_scheduler.config.get("prediction_type", "epsilon")
        self.prediction_type = self.config.prediction_type or configured
        if self.prediction_type != configured:
            self.noise_scheduler.register_to_config(prediction_type=self.prediction_type)
        self.tokenizers, self.text_encoders = [], []
        if self.needs_text_encoders(conditioning_cached):
            self.tokenizers, self.text_encoders = load_text_encoders(self.model_config, self.root, "fp32", "cpu",
                                                                     empty_weights=empty_weights, quantized=False)

    def ensure_text_encoders(self, device: str = "cpu") -> list[Any]:
        """The text encoders for inference (live samples): loaded frozen, in the compute dtype, on
        `device`, when load() left them out. Loading leaves every RNG stream as it was."""
        import torch

        if not self.text_encoders:
            with torch.random.fork_rng(devices=[]):
                self.tokenizers, self.text_encoders = load_text_encoders(self.model_config, self.root,
                                                                         self.compute_dtype, device)
            self.text_encoders_loaded_for_inference = True
        return self.text_encoders

    def lora_settings(self, name: str) -> dict[str, Any]:
        """PEFT config arguments (LoraConfig's, or LoHaConfig's / LoKrConfig's for train.lora.type loha /
        lokr) of one component (unet, text_encoder_1, text_encoder_2); also the adapter metadata saved with
        the weights, so every loader rebuilds the same adapter.

        Text encoder layers that never reach the UNet (see conditioning_layers) get no adapter:
        they would train nothing and export all-zero LoRA up weights.
        """
        lora = self.config.lora
        if name == "unet":
            return adapter_settings(lora, UNET_LORA_TARGETS[lora.targets])
        encoder = self.text_encoders[TEXT_ENCODER_NAMES.index(name)]
        settings = adapter_settings(lora, TEXT_LORA_TARGETS[lora.targets])
        layers = conditioning_layers(encoder)
        if len(layers) < encoder.config.num_hidden_layers:
            settings |= {"layers_to_transform": layers, "layers_pattern": "layers"}
        return settings

    def mode_of(self, name: str) -> str:
        """frozen, lora or full for unet / text_encoder_1 / text_encoder_2."""
        return self.config.mode if name == "unet" else getattr(self.config, name).mode

    def setup_training(self, device: Any = None) -> None:
        """Freeze what is frozen, add the adapters (train.lora.type), hold frozen weights in the compute dtype, enable
        memory/speed options.

        Adapters are added to the fp32 base, so their initial values are fp32 draws whatever the
        precision (PEFT would give them the base layer's dtype), and only then is every frozen
        tensor cast: under mixed precision the frozen weights are bf16/fp16, the trained ones fp32.
        With model.quantize the frozen tensors are cast first and the frozen linear layers quantized
        (tuneline.models.quantize), then the adapters are added (PEFT's quantized LoRA layers) and
        put back in fp32: their initial values are the same draws rounded to the frozen dtype.
        """
        config = self.config
        frozen_dtype = torch_dtype(self.compute_dtype)
        modules = [("unet", self.unet), *zip(TEXT_ENCODER_NAMES, self.text_encoders)]
        for name, module in modules:
            mode = self.mode_of(name)
            module.requires_grad_(mode == "full")
            quantize_frozen(module, self.model_config.quantize, frozen_dtype,
                            FAMILY.full_precision.get(DIFFUSERS_NAMES[name], ()), device)
            if mode == "lora":
                module.add_adapter(peft_config(self.lora_settings(name), config.lora.dropout))
                keep_trained_fp32(module)
            if name == "unet":  # model.training_adapter: frozen, active in training steps only
                load_training_adapter(FAMILY, module, self.model_config, mode, self.root)
            if mode != "full":
                cast_frozen(module, frozen_dtype)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for name, encoder in zip(TEXT_ENCODER_NAMES, self.text_encoders):
                if getattr(config, name).mode != "frozen":
                    encoder.gradient_checkpointing_enable()
        if config.attention == "eager":
            from diffusers.models.attention_processor import AttnProcessor

            self.unet.set_attn_processor(AttnProcessor())
        # SDPA (AttnProcessor2_0) is diffusers' default on torch 2.

    def trained_modules(self) -> dict[str, Any]:
        """name -> module for every module with trainable parameters (what the trainer prepares)."""
        modules = {"unet": self.unet}
        for name, encoder in zip(TEXT_ENCODER_NAMES, self.text_encoders):
            if getattr(self.config, name).mode != "frozen":
                modules[name] = encoder
        return modules

    def frozen_modules(self) -> dict[str, Any]:
        return {name: encoder for name, encoder in zip(TEXT_ENCODER_NAMES, self.text_encoders)
                if getattr(self.config, name).mode == "frozen"}

    def param_groups(self, modules: dict[str, Any]) -> list[ParamGroup]:
        """One optimizer group per trained module, each with its own learning rate."""
        groups: list[ParamGroup] = []
        for name, module in modules.items():
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ParamsError(f"train: {name} has nothing to train (check train.mode and train.lora.targets)")
            lr = self.config.lr if name == "unet" else (getattr(self.config, name).lr or self.config.lr)
            groups.append({"name": name, "params": params, "lr": lr})
        return groups

    def optimization_units(self, modules: dict[str, Any]) -> list[UnitSpec]:
        """One unit over every trained module, from the train section."""
        return [model_unit(self.param_groups(modules), self.config)]

    def ema_modules(self) -> list[str]:
        return list(self.trained_modules())

    def state_tensors(self, modules: dict[str, Any]) -> dict[str, Any]:
        """None: every tensor a step changes is a trained parameter (or optimizer state)."""
        return {}

    def example_batch(self, batch_size: int, bucket: tuple[int, int], device: Any, with_text: bool = True) -> dict:
        """A batch shaped like LatentData.batch's at `bucket` (width, height) in pixels, zeros on
        `device` ("meta" for the memory estimate): latents of the VAE's x8 grid and, `with_text`,
        cached prompt embeddings and pooled embeddings of the UNet's sizes."""
        import torch

        width, height = bucket
        config = self.unet.config
        batch: dict[str, Any] = {
            "latents": torch.zeros(batch_size, config.in_channels, height // LATENT_FACTOR, width // LATENT_FACTOR,
                                   device=device),
            "captions": [""] * batch_size,
            "original_size": [tuple(bucket)] * batch_size,
            "crop_top_left": [(0, 0)] * batch_size,
            "target_size": [tuple(bucket)] * batch_size,
            "loss_weight": torch.ones(batch_size, device=device),
            "ids": [f"example{i}" for i in range(batch_size)],
        }
        if with_text:
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            batch["prompt_embeds"] = torch.zeros(batch_size, MAX_TOKENS, config.cross_attention_dim, device=device)
            batch["pooled"] = torch.zeros(batch_size, pooled, device=device)
        return batch

    # --- the loss ----------------------------------------------------------------------

    def time_ids(self, batch: dict[str, Any], device: Any) -> Any:
        """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample."""
        import torch

        rows = []
        for (orig_w, orig_h), (top, left), (target_w, target_h) in zip(
                batch["original_size"], batch["crop_top_left"], batch["target_size"]):
            rows.append([orig_h, orig_w, top, left, target_h, target_w])
        # Made on the host, copied without waiting for the GPU (a tensor built on the device would sync).
        return host_to_device(torch.tensor(rows, dtype=torch.float32), device)

    def conditioning(self, modules: dict[str, Any], captions: list[str], device: Any) -> tuple[Any, Any]:
        """(prompt_embeds, pooled) through the live encoders; frozen ones without a graph."""
        import torch

        encoders = [modules.get(name, encoder) for name, encoder in zip(TEXT_ENCODER_NAMES, self.text_encoders)]
        if all(getattr(self.config, name).mode == "frozen" for name in TEXT_ENCODER_NAMES):
            with torch.no_grad():
                return encode_prompts(self.tokenizers, encoders, captions, device)
        return encode_prompts(self.tokenizers, encoders, captions, device)

    def loss(self, modules: dict[str, Any], batch: dict[str, Any], generator: Any, step: int) -> tuple[Any, dict]:
        """Weighted mean diffusion loss of the batch, and per-batch facts to log."""
        import torch

        latents = batch["latents"]
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        if self.config.loss.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=device)
            noise = noise + self.config.loss.noise_offset * offset
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=device)
        per_sample, weights, x0_pred, _ = self._per_sample(modules, batch, noise, timesteps, step)
        losses, metrics = with_structure(per_sample * weights, batch, x0_pred, batch["latents"], self.latent_rgb)
        # Per-batch facts stay tensors: reading them is a host sync, done only when they are logged.
        return losses.mean(), {"timestep_mean": timesteps.detach().float().mean(), **metrics,
                               **loss_split(losses, batch)}

    def per_sample_losses(self, modules: dict[str, Any], batch: dict[str, Any], noise: Any, timesteps: Any,
                          step: int) -> tuple[Any, Any]:
        """(weighted, unweighted) loss of each sample at the given noise and timesteps (the validation
        loss): the training loss's terms (train.loss.type), weighted by min-SNR / min-sigma and the data set's weight
        with the style/structure terms added, or the plain squared error."""
        per_sample, weights, x0_pred, squared = self._per_sample(modules, batch, noise, timesteps.long(), step)
        losses, _ = with_structure(per_sample * weights, batch, x0_pred, batch["latents"], self.latent_rgb)
        return losses, squared

    def _per_sample(self, modules: dict[str, Any], batch: dict[str, Any], noise: Any, timesteps: Any,
                    step: int) -> tuple[Any, Any, Any, Any]:
        """(loss of each sample (train.loss.type), its weight, the clean latent the prediction implies, its squared
        error) of the epsilon / v target at `noise`, `timesteps`; the clean latent only for the style/structure
        loss (else None)."""
        latents = batch["latents"]
        device = latents.device
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        def predict() -> Any:  # called again with the trained adapters off for prior_prediction samples
            if "prompt_embeds" in batch:
                prompt_embeds, pooled = batch["prompt_embeds"], batch["pooled"]
            else:
                prompt_embeds, pooled = self.conditioning(modules, batch["captions"], device)
            return modules["unet"](
                noisy, timesteps, prompt_embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": self.time_ids(batch, device)},
            ).sample

        prediction = predict()
        target = with_prior_targets(target, batch, modules.values(), predict)
        levels = ddpm_noise_levels(self.noise_scheduler.alphas_cumprod, timesteps,
                                   self.noise_scheduler.config.num_train_timesteps)
        per_sample, squared = per_sample_loss_and_mse(prediction, target, self.config.loss, levels,
                                                      mask_weights(batch, self.config.masked_loss))
        snr = snr_of(self.noise_scheduler.alphas_cumprod, timesteps)
        weights = loss_weights(self.config.loss, snr, self.prediction_type, step) * host_to_device(batch["loss_weight"],
                                                                                                    device)
        x0_pred = (ddpm_x0(prediction, noisy, self.noise_scheduler.alphas_cumprod, timesteps, self.prediction_type)
                   if "structure" in batch else None)
        return per_sample, weights, x0_pred, squared

    def unit_losses(self, modules: dict[str, Any], batch: dict[str, Any], generator: Any, step: int,
                    due: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The one unit's loss (`loss`), under the trainer's unit contract."""
        loss, extra = self.loss(modules, batch, generator, step)
        return {MODEL_UNIT: loss}, extra

    # --- outputs -----------------------------------------------------------------------

    def save(self, modules: dict[str, Any], out_dir: Path) -> Path:
        """The adapters' weights in diffusers' LoRA file (alpha and, for LoHa / LoKr, the type kept in the adapter
        metadata) and/or a full pipeline folder."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        modes = {self.mode_of(name) for name in DIFFUSERS_NAMES}
        if "lora" in modes:
            self._save_lora(modules, out_dir)
        if "full" in modes:
            self._save_pipeline(modules, out_dir / PIPELINE_DIR)
        return out_dir

    def _save_lora(self, modules: dict[str, Any], out_dir: Path) -> None:
        from diffusers import StableDiffusionXLPipeline

        arguments: dict[str, Any] = {}
        for name, keyword in DIFFUSERS_NAMES.items():
            if self.mode_of(name) == "lora":
                # diffusers loads text encoder adapters through transformers, which finds a DoRA magnitude
                # only as `lora_magnitude_vector.weight` (PEFT's state dict drops the `.weight`; without it
                # the magnitudes are silently re-initialised). The UNet path reads both forms.
                arguments[f"{keyword}_lora_layers"] = {
                    f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key: value
                    for key, value in trained_state_dict(modules[name]).items()}
                arguments[f"{keyword}_lora_adapter_metadata"] = self.lora_settings(name)
        StableDiffusionXLPipeline.save_lora_weights(out_dir, **arguments, safe_serialization=True)
        canonicalize(out_dir / LORA_FILE)  # identical weights, identical bytes

    def _save_pipeline(self, modules: dict[str, Any], out_dir: Path) -> None:
        """The base pipeline with the fully trained components replaced (LoRA-only parts stay base) and
        the scheduler set to what training learned (prediction type, zero terminal SNR)."""
        from diffusers import StableDiffusionXLPipeline

        base = _base_location(self.model_config, self.root)
        kwargs = {"revision": self.model_config.revision} if isinstance(base, str) and self.model_config.revision else {}
        replaced = {keyword: modules[name] for name, keyword in DIFFUSERS_NAMES.items() if self.mode_of(name) == "full"}
        if self.model_config.vae:  # the VAE the latents were made with (e.g. the autoencoder stage's), not base's
            replaced["vae"] = load_vae(self.model_config, self.root, "fp32", "cpu")
        pipeline = StableDiffusionXLPipeline.from_pretrained(base, **kwargs, **replaced)
        settings = inference_scheduler_settings(self.prediction_type, self.config.zero_terminal_snr)
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, **settings)
        pipeline.save_pretrained(out_dir, safe_serialization=True)
