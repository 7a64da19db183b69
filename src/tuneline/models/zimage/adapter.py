"""The Z-Image adapter: what the trainer core needs that is specific to Z-Image.

Z-Image is a flow-matching single-stream DiT (ZImageTransformer2DModel) conditioned on the
second-to-last hidden state of one Qwen3 decoder LM, one variable-length embedding per prompt.
The adapter loads the transformer and the scheduler config (the VAE never: latents are cached;
the text encoder only when a step encodes captions), applies the training mode (LoRA, LoHa or LoKr through
PEFT on the attention projections, optionally the feed-forward layers, or full), holds frozen
weights in the compute dtype of mixed precision, computes the flow-matching loss exactly as
`tuneline.train.flow_matching` defines it (its docstring has the sign conventions, checked
against ZImagePipeline), and saves in diffusers format (LoRA that ZImagePipeline.load_lora_weights
loads, or a full ZImagePipeline folder).

The Qwen3 text encoder is always frozen here; settings of SDXL's DDPM objective or its CLIP
encoders are ParamsErrors, raised when the adapter is built (before any compute).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tuneline.core.device import cast_frozen, compute_dtype_name, torch_dtype
from tuneline.core.logs import quiet_libraries
from tuneline.core.params import ParamsError
from tuneline.core.tensorfile import canonicalize
from tuneline.models.loading import _base_location, load_vae, load_zimage_text_encoder
from tuneline.models.lycoris import adapter_settings, peft_config, trained_state_dict
from tuneline.models.lycoris import refuse as refuse_lycoris
from tuneline.models.quantize import keep_trained_fp32, quantize_frozen, refuse_full_training
from tuneline.models.training_adapter import load_training_adapter
from tuneline.models.zimage import FAMILY
from tuneline.models.zimage.text import MAX_SEQUENCE_LENGTH, encode_prompts
from tuneline.models.config import ModelConfig
from tuneline.train.units import MODEL_UNIT, ParamGroup, UnitSpec, model_unit
from tuneline.train.config import TrainConfig
from tuneline.train.output import LORA_FILE, PIPELINE_DIR
from tuneline.train.prior import loss_split, with_prior_targets
from tuneline.train.structure_loss import LatentRGB, with_structure

log = logging.getLogger(__name__)

# PEFT target modules per train.lora.targets. A list is a suffix match on module names (every
# attention of the noise refiner, the context refiner and the main layers); "all" also adapts
# the blocks' adaLN modulation, named by a regex because the final layer's adaLN_modulation.0
# is a SiLU (its Linear is .1), which PEFT cannot adapt.
_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
_FEED_FORWARD = ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
TRANSFORMER_LORA_TARGETS: dict[str, Any] = {
    "attention": _ATTENTION,
    "attention_mlp": _ATTENTION + _FEED_FORWARD,
    "all": r"(noise_refiner|context_refiner|layers)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)"
           r"|feed_forward\.w[123]|adaLN_modulation\.0)",
}
LATENT_FACTOR = 8  # Z-Image's (Flux's) VAE: latents are 1/8 of the image in each direction
# Caption tokens the memory estimate assumes per prompt (chat template included).
EXAMPLE_CAPTION_TOKENS = 128
# Z-Image's VAE is Flux's (16 channels, scaling 0.3611, shift 0.1159), and ComfyUI previews Z-Image with Flux's
# factors: comfy/supported_models.py class ZImage(Lumina2) keeps Lumina2's latent_format = Flux, and
# comfy/latent_formats.py class Flux holds latent_rgb_factors and latent_rgb_factors_bias
# (github.com/comfyanonymous/ComfyUI, commit 040a3243). The previewer projects the sampler's x0, in the model's
# space (process_latent_in: (z - 0.1159) * 0.3611): the scaled and shifted latents our batches hold.
LATENT_RGB = LatentRGB(
    factors=((-0.0346, 0.0244, 0.0681),
             (0.0034, 0.0210, 0.0687),
             (0.0275, -0.0668, -0.0433),
             (-0.0174, 0.0160, 0.0617),
             (0.0859, 0.0721, 0.0329),
             (0.0004, 0.0383, 0.0115),
             (0.0405, 0.0861, 0.0915),
             (-0.0236, -0.0185, -0.0259),
             (-0.0245, 0.0250, 0.1180),
             (0.1008, 0.0755, -0.0421),
             (-0.0515, 0.0201, 0.0011),
             (0.0428, -0.0012, -0.0036),
             (0.0817, 0.0765, 0.0749),
             (-0.1264, -0.0522, -0.1103),
             (-0.0280, -0.0881, -0.0499),
             (-0.1262, -0.0982, -0.0778)),
    bias=(-0.0329, -0.0718, -0.0851),
    source="ComfyUI comfy/latent_formats.py Flux.latent_rgb_factors and latent_rgb_factors_bias (ComfyUI's ZImage)")


class ZImageAdapter:
    """One Z-Image model under training. Modules are plain torch modules until the trainer prepares them."""

    family = "zimage"
    prediction_type = "flow"  # recorded in trainer_state.json: the velocity noise - x0
    compiled_module = "transformer"  # the module train.compile compiles
    latent_rgb = LATENT_RGB  # the style/structure loss's projection (train.loss.structure)

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, root: Path) -> None:
        FAMILY.refuse_unsupported(train_config)  # also checked before any stage computes (tuneline.preflight)
        refuse_full_training(model_config.quantize, train_config)
        refuse_lycoris(model_config.quantize, train_config)  # also checked by tuneline check
        self.model_config = model_config
        self.config = train_config
        self.root = Path(root)
        self.transformer: Any = None
        self.scheduler_config: dict[str, Any] = {}
        self.tokenizers: list[Any] = []
        self.text_encoders: list[Any] = []
        self.text_encoders_loaded_for_inference = False

    @property
    def compute_dtype(self) -> str:
        return compute_dtype_name(self.config.mixed_precision)

    def _kwargs(self, base: Path | str) -> dict[str, Any]:
        return {"revision": self.model_config.revision} if isinstance(base, str) and self.model_config.revision else {}

    # --- loading and set-up -----------------------------------------------------------

    def needs_text_encoders(self, conditioning_cached: bool) -> bool:
        """Whether a training step runs the text encoder: only when the embeddings are not cached."""
        return not conditioning_cached

    def load(self, conditioning_cached: bool = False, empty_weights: bool = False) -> None:
        """The transformer, the scheduler's config (for the shift) and, when a step encodes
        captions, the tokenizer and text encoder. `empty_weights`: on the meta device (the memory
        estimate)."""
        quiet_libraries()
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

        base = _base_location(self.model_config, self.root)
        kwargs = self._kwargs(base)
        if empty_weights:
            from accelerate import init_empty_weights

            with init_empty_weights():
                self.transformer = ZImageTransformer2DModel.from_config(
                    ZImageTransformer2DModel.load_config(base, subfolder="transformer", **kwargs))
        else:
            self.transformer = ZImageTransformer2DModel.from_pretrained(base, subfolder="transformer", **kwargs)
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(base, subfolder="scheduler", **kwargs))
        self.tokenizers, self.text_encoders = [], []
        if self.needs_text_encoders(conditioning_cached):
            tokenizer, encoder = load_zimage_text_encoder(self.model_config, self.root, "fp32", "cpu", empty_weights,
                                                          quantized=False)
            self.tokenizers, self.text_encoders = [tokenizer], [encoder]

    def ensure_text_encoders(self, device: str = "cpu") -> list[Any]:
        """[the text encoder] for inference (live samples): loaded frozen, in the compute dtype, on
        `device`, when load() left it out. Loading leaves every RNG stream as it was."""
        import torch

        if not self.text_encoders:
            with torch.random.fork_rng(devices=[]):
                tokenizer, encoder = load_zimage_text_encoder(self.model_config, self.root, self.compute_dtype, device)
            self.tokenizers, self.text_encoders = [tokenizer], [encoder]
            self.text_encoders_loaded_for_inference = True
        return self.text_encoders

    def lora_settings(self, name: str = "transformer") -> dict[str, Any]:
        """PEFT config arguments of the transformer (LoraConfig's, or LoHaConfig's / LoKrConfig's for
        train.lora.type loha / lokr); also the adapter metadata saved with the weights, so every loader
        rebuilds the same adapter (alpha included)."""
        return adapter_settings(self.config.lora, TRANSFORMER_LORA_TARGETS[self.config.lora.targets])

    def mode_of(self, name: str) -> str:
        return self.config.mode if name == "transformer" else "frozen"

    def setup_training(self, device: Any = None) -> None:
        """Freeze what is frozen, add the adapter of train.lora.type (fp32 draws on the fp32 base), then hold every
        frozen tensor in the compute dtype; gradient checkpointing when asked. With model.quantize the
        frozen tensors are cast and quantized first, and the adapter put back in fp32 once added (see
        SDXLAdapter.setup_training)."""
        frozen_dtype = torch_dtype(self.compute_dtype)
        mode = self.config.mode
        self.transformer.requires_grad_(mode == "full")
        quantize_frozen(self.transformer, self.model_config.quantize, frozen_dtype,
                        FAMILY.full_precision.get("transformer", ()), device)
        if mode == "lora":
            self.transformer.add_adapter(peft_config(self.lora_settings(), self.config.lora.dropout))
            keep_trained_fp32(self.transformer)
        load_training_adapter(FAMILY, self.transformer, self.model_config, mode, self.root)  # frozen, steps only
        if mode != "full":
            cast_frozen(self.transformer, frozen_dtype)
        for encoder in self.text_encoders:
            cast_frozen(encoder, frozen_dtype)
            quantize_frozen(encoder, self.model_config.quantize, keep=FAMILY.full_precision.get("text_encoder", ()),
                            device=device)
        if self.config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    def trained_modules(self) -> dict[str, Any]:
        return {"transformer": self.transformer}

    def frozen_modules(self) -> dict[str, Any]:
        return {"text_encoder": encoder for encoder in self.text_encoders}

    def param_groups(self, modules: dict[str, Any]) -> list[ParamGroup]:
        params = [p for p in modules["transformer"].parameters() if p.requires_grad]
        if not params:
            raise ParamsError("train: the transformer has nothing to train (check train.mode and train.lora.targets)")
        return [{"name": "transformer", "params": params, "lr": self.config.lr}]

    def optimization_units(self, modules: dict[str, Any]) -> list[UnitSpec]:
        """One unit over the transformer, from the train section."""
        return [model_unit(self.param_groups(modules), self.config)]

    def ema_modules(self) -> list[str]:
        return list(self.trained_modules())

    def state_tensors(self, modules: dict[str, Any]) -> dict[str, Any]:
        """None: every tensor a step changes is a trained parameter (or optimizer state)."""
        return {}

    def example_batch(self, batch_size: int, bucket: tuple[int, int], device: Any, with_text: bool = True) -> dict:
        """A batch shaped like LatentData.batch's at `bucket` (width, height), zeros on `device`, with
        caption features of EXAMPLE_CAPTION_TOKENS tokens each whatever `with_text` says: the frozen
        text encoder runs without a graph, so it saves no activations for backward (the estimate
        counts its weights; Qwen3's masking cannot run on the meta device anyway)."""
        import torch

        width, height = bucket
        config = self.transformer.config
        batch: dict[str, Any] = {
            "latents": torch.zeros(batch_size, config.in_channels, height // LATENT_FACTOR, width // LATENT_FACTOR,
                                   device=device),
            "captions": [""] * batch_size,
            "loss_weight": torch.ones(batch_size, device=device),
            "ids": [f"example{i}" for i in range(batch_size)],
            "prompt_embeds": [torch.zeros(EXAMPLE_CAPTION_TOKENS, config.cap_feat_dim, device=device)
                              for _ in range(batch_size)],
        }
        return batch

    # --- the loss ----------------------------------------------------------------------

    def conditioning(self, captions: list[str], device: Any) -> list[Any]:
        """One [tokens, hidden] caption feature per caption through the frozen text encoder."""
        import torch

        with torch.no_grad():
            return encode_prompts(self.tokenizers[0], self.text_encoders[0], captions, MAX_SEQUENCE_LENGTH, device)

    def sigmas(self, batch_size: int, latent_size: tuple[int, int], generator: Any, device: Any) -> Any:
        """One noise level per sample, drawn and shifted as train.flow_matching says."""
        from tuneline.train.flow_matching import sample_sigmas

        fm = self.config.flow_matching
        return sample_sigmas(batch_size, fm.timestep_sampling, generator, fm.logit_mean, fm.logit_std, fm.mode_scale,
                             shift=fm.shift, scheduler_config=self.scheduler_config, latent_size=latent_size,
                             device=device)

    def loss(self, modules: dict[str, Any], batch: dict[str, Any], generator: Any, step: int) -> tuple[Any, dict]:
        """Weighted mean flow-matching loss of the batch, and per-batch facts to log."""
        import torch

        latents = batch["latents"]
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        sigmas = self.sigmas(latents.shape[0], tuple(latents.shape[-2:]), generator, device)
        losses, _, _, metrics = self._sample_losses(modules, batch, noise, sigmas)
        return losses.mean(), {"sigma_mean": sigmas.detach().float().mean(), **metrics, **loss_split(losses, batch)}

    def per_sample_losses(self, modules: dict[str, Any], batch: dict[str, Any], noise: Any, timesteps: Any,
                          step: int) -> tuple[Any, Any]:
        """(weighted, unweighted) loss of each sample at the given noise and noise levels (the validation
        loss): sigma = timesteps / 1000, unshifted; train.loss.type weighted by train.flow_matching.loss_weighting
        and the data set's weight with the style/structure terms added, or the plain squared error."""
        from tuneline.train.loss import per_sample_mse

        sigmas = timesteps.float().to(batch["latents"].device) / 1000.0
        losses, prediction, target, _ = self._sample_losses(modules, batch, noise, sigmas)
        return losses, per_sample_mse(prediction, target)

    def _sample_losses(self, modules: dict[str, Any], batch: dict[str, Any], noise: Any,
                       sigmas: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
        """(each sample's training loss: train.loss.type, the flow weighting and the data set's weight, the
        style/structure terms added; the prediction; the target; the structure terms to log) at `noise`, `sigmas`."""
        from tuneline.models.loading import host_to_device
        from tuneline.train.flow_matching import flow_matching_loss, loss_weighting
        from tuneline.train.loss import mask_weights

        latents = batch["latents"]
        prediction, target, x0_pred = self._prediction_and_target(modules, batch, noise, sigmas)
        weighting = loss_weighting(self.config.flow_matching.loss_weighting, sigmas)
        weighted = flow_matching_loss(prediction, target, weighting, host_to_device(batch["loss_weight"], latents.device),
                                      reduce=False, loss=self.config.loss, sigmas=sigmas,
                                      mask=mask_weights(batch, self.config.masked_loss))
        losses, metrics = with_structure(weighted, batch, x0_pred, latents, self.latent_rgb)
        return losses, prediction, target, metrics

    def _prediction_and_target(self, modules: dict[str, Any], batch: dict[str, Any], noise: Any,
                               sigmas: Any) -> tuple[Any, Any, Any]:
        """The velocity the transformer predicts at `noise`, `sigmas`, the target noise - x0, and the clean
        latent the prediction implies (for the style/structure loss; else None)."""
        import torch

        from tuneline.train.flow_matching import (noisy_latents, predicted_x0, velocity_target, zimage_timestep,
                                                  zimage_velocity)

        latents = batch["latents"]
        noisy = noisy_latents(latents, noise, sigmas)
        if "prompt_embeds" in batch:
            # Cached in the latents stage's dtype; the transformer's caption embedder takes the latents'.
            caption_features = [features.to(latents.dtype) for features in batch["prompt_embeds"]]
        else:
            caption_features = self.conditioning(batch["captions"], latents.device)

        def predict() -> Any:  # called again with the trained adapters off for prior_prediction samples
            # The pipeline's input: a list of [C, 1, H, W] latents (one frame), the time 1 - sigma.
            output = modules["transformer"](list(noisy.unsqueeze(2).unbind(0)), zimage_timestep(sigmas),
                                            caption_features, return_dict=False)[0]
            return zimage_velocity(torch.stack([sample.float() for sample in output]).squeeze(2))

        prediction = predict()
        x0_pred = predicted_x0(noisy, prediction, sigmas) if "structure" in batch else None
        target = with_prior_targets(velocity_target(latents, noise), batch, modules.values(), predict)
        return prediction, target, x0_pred

    def unit_losses(self, modules: dict[str, Any], batch: dict[str, Any], generator: Any, step: int,
                    due: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The one unit's loss (`loss`), under the trainer's unit contract."""
        loss, extra = self.loss(modules, batch, generator, step)
        return {MODEL_UNIT: loss}, extra

    # --- outputs -----------------------------------------------------------------------

    def save(self, modules: dict[str, Any], out_dir: Path) -> Path:
        """LoRA weights in diffusers format (alpha in the adapter metadata) or a full pipeline folder."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.config.mode == "lora":
            self._save_lora(modules, out_dir)
        else:
            self._save_pipeline(modules, out_dir / PIPELINE_DIR)
        return out_dir

    def _save_lora(self, modules: dict[str, Any], out_dir: Path) -> None:
        from diffusers import ZImagePipeline

        ZImagePipeline.save_lora_weights(
            out_dir, transformer_lora_layers=trained_state_dict(modules["transformer"]),
            transformer_lora_adapter_metadata=self.lora_settings(), safe_serialization=True)
        canonicalize(out_dir / LORA_FILE)  # identical weights, identical bytes

    def _save_pipeline(self, modules: dict[str, Any], out_dir: Path) -> None:
        """The base pipeline with the trained transformer (and model.vae, the VAE the latents were made with)."""
        from diffusers import ZImagePipeline

        base = _base_location(self.model_config, self.root)
        replaced: dict[str, Any] = {"transformer": modules["transformer"]}
        if self.model_config.vae:
            replaced["vae"] = load_vae(self.model_config, self.root, "fp32", "cpu")
        pipeline = ZImagePipeline.from_pretrained(base, **self._kwargs(base), **replaced)
        pipeline.save_pretrained(out_dir, safe_serialization=True)
