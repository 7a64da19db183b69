"""Pipelines and rendering: the base model, the trained result on top of it, and live
evaluation from the modules under training.

Every prompt gets its own CPU torch.Generator seeded from the prompt's seed, so the base
and the trained model start from the same noise and their images compare pixel for pixel.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.core.logs import quiet_libraries
from tuneline.models.config import ModelConfig
from tuneline.core.fsutil import atomic_path
from tuneline.stages.render.prompts import RenderPrompt

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
PIPELINE_DIR = "pipeline"
EMA_DIR = "ema"  # optional: models/train/ema/, the EMA weights in the same layout, when saved apart
LIVE_DIR = "live"  # renders/live/step_NNNNNN/<i>.png (or models/train/live/...)
WEIGHTS_RECORD = "weights.json"  # renders/final/weights.json: which trained weights the final images show
ADAPTER_NAME = "trained"


def save_png(image: Any, path: Path) -> Path:
    """Write a PIL image atomically (a killed render never leaves a truncated PNG)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def load_base_pipeline(model_config: ModelConfig, root: Path | None, device: str = "auto", dtype: str = "auto",
                       family: str | None = None) -> Any:
    """The base pipeline of `model_config` (model.vae swapped in when set), on `device`: the family's
    text-to-image pipeline (StableDiffusionXLPipeline, ZImagePipeline); `family` None detects it."""
    quiet_libraries()  # before the import: it warns while importing
    import diffusers

    from tuneline.models.loading import _base_location, load_vae, resolve_device, resolve_dtype, torch_dtype
    from tuneline.models.family import detect_family
    from tuneline.stages.render.samplers import render_family

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    base = _base_location(model_config, root)
    kwargs: dict[str, Any] = {}
    if isinstance(base, str) and model_config.revision:
        kwargs["revision"] = model_config.revision
    if model_config.vae:
        kwargs["vae"] = load_vae(model_config, root, dtype, device)
    spec = render_family(family or detect_family(model_config, root))
    pipeline = getattr(diffusers, spec.pipeline).from_pretrained(base, dtype=torch_dtype(dtype), **kwargs)
    if device != "cpu":  # loaded on the CPU; moving there again only makes diffusers warn
        with _quiet_diffusers():
            pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def trainer_state(trained_dir: Path) -> dict[str, Any]:
    path = Path(trained_dir) / "trainer_state.json"
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def _weights_dir(trained_dir: Path, use_ema: bool, notes: list[str]) -> Path:
    """Where the weights to render are: models/train, or models/train/ema when asked and present."""
    trained_dir = Path(trained_dir)
    ema_enabled = bool(trainer_state(trained_dir).get("train_config", {}).get("ema", {}).get("enabled"))
    separate = trained_dir / EMA_DIR
    if use_ema:
        if separate.is_dir():
            return separate
        if not ema_enabled:
            notes.append("render.use_ema is on but the run kept no EMA weights (train.ema.enabled was off): "
                         "rendering the trained weights")
    elif ema_enabled and not separate.is_dir():
        notes.append("train.ema.enabled was on: the trainer's result holds the EMA weights, so those are rendered "
                     "(render.use_ema: false has no raw weights to choose)")
    return trained_dir


def weights_identity(weights_dir: Path, root: Path | None = None) -> str:
    """Digest of the trained weights in `weights_dir` (its LoRA file and full pipeline folder): names
    exactly what a sample was rendered from and what export ships (file digests are cached by stat)."""
    from tuneline.core.fsutil import digest_json
    from tuneline.models.ref import model_identity

    weights_dir = Path(weights_dir)
    return digest_json({name: model_identity(str(weights_dir / name), root=root)
                        for name in (LORA_FILE, PIPELINE_DIR) if (weights_dir / name).exists()})


@dataclass
class Applied:
    """What apply_trained put on the pipeline, and what the user should know about it."""

    loaded: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source: Path | None = None  # the folder the weights came from (models/train or models/train/ema)


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' info/warning chatter (e.g. 'No LoRA keys ... text_encoder' for a UNet-only LoRA) off."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def apply_trained(pipeline: Any, trained_dir: Path, lora_scale: float = 1.0, use_ema: bool = False) -> Applied:
    """Put the trained result on `pipeline`: full components from <dir>/pipeline, then the LoRA at `lora_scale`.

    The family's components (SDXL: unet and the text encoders; Z-Image: transformer and the text
    encoder), each of the class its saved folder names. SDXL: also applies the training's prediction
    type and zero-terminal-SNR setting to the pipeline's scheduler (from trainer_state.json); Z-Image's
    flow-match scheduler has neither.
    """
    from tuneline.stages.render.samplers import family_of_pipeline

    applied = Applied()
    spec = family_of_pipeline(pipeline)
    notes = applied.loaded
    source = applied.source = _weights_dir(trained_dir, use_ema, applied.warnings)
    state = trainer_state(trained_dir)
    train = state.get("train_config", {})
    full = source / PIPELINE_DIR
    lora = source / LORA_FILE
    if not full.is_dir() and not lora.is_file():
        raise FileNotFoundError(f"{source}: neither {LORA_FILE} nor {PIPELINE_DIR}/ found: run stage train first")
    denoiser = getattr(pipeline, spec.denoiser)
    device, dtype = denoiser.device, denoiser.dtype
    if full.is_dir():
        replaced = {}
        for component, section in spec.full_components.items():
            trained_fully = (train.get("mode") == "full" if section is None
                             else train.get(section, {}).get("mode") == "full")
            if (full / component).is_dir() and (trained_fully or not train):
                module = _component_class(full, component).from_pretrained(full, subfolder=component, dtype=dtype)
                replaced[component] = module.to(device).eval()
        pipeline.register_modules(**replaced)
        notes.append(f"full weights: {', '.join(replaced) or 'none'} from {full}")
    if lora.is_file():
        with _quiet_diffusers():
            pipeline.load_lora_weights(source, weight_name=LORA_FILE, adapter_name=ADAPTER_NAME)
        pipeline.set_adapters([ADAPTER_NAME], adapter_weights=[lora_scale])
        notes.append(f"LoRA {lora} at scale {lora_scale}")
    if spec.name != "sdxl":  # flow matching: no prediction type or noise schedule to carry over
        return applied
    from tuneline.models.sdxl.adapter import inference_scheduler_settings

    config = pipeline.scheduler.config
    prediction_type = state.get("prediction_type") or train.get("prediction_type") or config.get("prediction_type")
    settings = inference_scheduler_settings(prediction_type, bool(train.get("zero_terminal_snr")))
    overrides = {key: value for key, value in settings.items() if config.get(key) != value}
    if overrides:
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, **overrides)
        notes.append(f"scheduler settings from training: {overrides}")
    return applied


def _component_class(pipeline_dir: Path, component: str) -> type:
    """The class a saved pipeline folder names for `component` in its model_index.json."""
    import importlib

    index = json.loads((Path(pipeline_dir) / "model_index.json").read_text("utf-8"))
    library, name = index[component]
    return getattr(importlib.import_module(library), name)


def render_prompts(pipeline: Any, prompts: Sequence[RenderPrompt], out_dir: Path | None, prefix: str = "",
                   path_of: Any = None) -> list[Path]:
    """Render each prompt to <out_dir>/<prefix><index>.png (or `path_of(prompt)`) with its own sampler
    and seeded generator."""
    import torch

    from tuneline.stages.render.samplers import family_of_pipeline
    from tuneline.stages.render.samplers import build_scheduler

    out_dir = Path(out_dir) if out_dir is not None else None
    family = family_of_pipeline(pipeline)
    base_scheduler = pipeline.scheduler
    paths = []
    try:
        for prompt in prompts:
            pipeline.scheduler = build_scheduler(prompt.sampler, base_scheduler.config, prompt.karras, family)
            generator = torch.Generator("cpu").manual_seed(prompt.seed)  # CPU noise: the same on every device
            image = pipeline(
                prompt=prompt.prompt, negative_prompt=prompt.negative_prompt or None,
                height=prompt.height, width=prompt.width, num_inference_steps=prompt.steps,
                guidance_scale=prompt.guidance_scale, generator=generator,
            ).images[0]
            target = path_of(prompt) if path_of is not None else out_dir / f"{prefix}{prompt.index}.png"
            paths.append(save_png(image, target))
    finally:
        pipeline.scheduler = base_scheduler
    return paths


# --- live evaluation during training ----------------------------------------------------


def _unwrap(module: Any) -> Any:
    """The plain module under DDP / FSDP / torch.compile wrappers (PEFT layers stay: they are the LoRA)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module, keep_fp32_wrapper=True, keep_torch_compile=False)


def _inference_scheduler(adapter: Any) -> Any:
    """The base folder's scheduler, with the training's prediction type and zero-terminal-SNR setting."""
    import diffusers

    from tuneline.models.loading import _base_location
    from tuneline.models.sdxl.adapter import inference_scheduler_settings

    model = adapter.model_config
    base = _base_location(model, adapter.root)
    kwargs = {"revision": model.revision} if isinstance(base, str) and model.revision else {}
    config = diffusers.EulerDiscreteScheduler.load_config(base, subfolder="scheduler", **kwargs)
    cls = getattr(diffusers, str(config.get("_class_name")), diffusers.EulerDiscreteScheduler)
    return cls.from_config(config, **inference_scheduler_settings(adapter.prediction_type,
                                                                  getattr(adapter.config, "zero_terminal_snr", False)))


def _zimage_pipeline_from_training(adapter: Any, modules: dict[str, Any], vae: Any = None) -> Any:
    """A ZImagePipeline sharing the live transformer (PEFT-wrapped in LoRA mode), the adapter's Qwen3
    text encoder and tokenizer, `vae` (default model.vae / the base VAE, fp32) and the base's
    flow-match scheduler."""
    import diffusers

    from tuneline.models.loading import _base_location, load_vae

    transformer = _unwrap(modules["transformer"])
    device = transformer.device
    encoder = _unwrap(modules["text_encoder"] if "text_encoder" in modules
                      else adapter.ensure_text_encoders(str(device))[0])
    if vae is None:
        vae = load_vae(adapter.model_config, adapter.root, "fp32", "cpu").to(device)
    model = adapter.model_config
    base = _base_location(model, adapter.root)
    kwargs = {"revision": model.revision} if isinstance(base, str) and model.revision else {}
    config = diffusers.FlowMatchEulerDiscreteScheduler.load_config(base, subfolder="scheduler", **kwargs)
    pipeline = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(config),
                                        vae=vae, text_encoder=encoder, tokenizer=adapter.tokenizers[0],
                                        transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_from_training(adapter: Any, modules: dict[str, Any], vae: Any = None) -> Any:
    """A pipeline of the adapter's family sharing the live training modules (no copies): SDXL's
    below; Z-Image's from `modules["transformer"]` (`_zimage_pipeline_from_training`).

    `modules` is the trainer's name -> (possibly accelerate-prepared) module dict: the UNet
    (PEFT-wrapped in LoRA mode) and any trained text encoders; frozen encoders and the
    tokenizers come from the adapter (which loads them on the UNet's device if training did
    not need them). Under mixed precision the frozen weights are in its compute dtype: render
    under the training's autocast. `vae` defaults to model.vae / the base VAE in fp32 on
    the UNet's device (load it once and pass it in to avoid reloading at every evaluation).
    """
    quiet_libraries()  # before the import: it warns while importing
    if getattr(adapter, "family", "sdxl") == "zimage":
        return _zimage_pipeline_from_training(adapter, modules, vae)
    from diffusers import StableDiffusionXLPipeline

    from tuneline.models.loading import load_vae
    from tuneline.models.sdxl.adapter import TEXT_ENCODER_NAMES

    unet = _unwrap(modules["unet"])
    device = unet.device
    # Training on cached text embeddings loads no text encoder; rendering needs them.
    frozen_encoders = adapter.ensure_text_encoders(str(device))
    encoders = [_unwrap(modules.get(name, encoder)) for name, encoder in zip(TEXT_ENCODER_NAMES, frozen_encoders)]
    if vae is None:
        vae = load_vae(adapter.model_config, adapter.root, "fp32", "cpu").to(device)
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=adapter.tokenizers[0],
        tokenizer_2=adapter.tokenizers[1], unet=unet, scheduler=_inference_scheduler(adapter))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextmanager
def preserved_training_state(modules: Sequence[Any]) -> Iterator[None]:
    """Restore, on exit, the global RNG streams (torch CPU and CUDA, python, numpy) and every
    submodule's train/eval flag of `modules`; the body runs with the modules in eval mode."""
    import numpy as np
    import torch

    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    flags = [(sub, sub.training) for module in modules for sub in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for sub, training in flags:
            sub.training = training
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def live_step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step:06d}"


def live_evaluate(pipeline: Any, prompts: Sequence[RenderPrompt], out_dir: Path, step: int,
                  tracker: Any = None) -> list[Path]:
    """Render `prompts` to <out_dir>/step_<step:06d>/<i>.png without disturbing training.

    Global RNG streams and train/eval flags are restored afterwards; everything runs under
    torch.inference_mode, so no graph and no gradient is touched. Call it on the main
    process only. With `tracker`, each image is also logged as live/step_<step>/<i>.png.
    """
    import torch

    modules = [c for c in pipeline.components.values() if isinstance(c, torch.nn.Module)]
    with preserved_training_state(modules), torch.inference_mode():
        paths = render_prompts(pipeline, prompts, live_step_dir(out_dir, step))
    if tracker is not None:
        from PIL import Image

        for path in paths:
            with Image.open(path) as image:
                tracker.log_image(image.copy(), f"live/{path.parent.name}/{path.name}")
    return paths


def live_prompts(params: Any, root: Path) -> list[RenderPrompt]:
    """The first render.live_prompts prompts of the prompts file (what live evaluation renders)."""
    from tuneline.models.family import detect_family
    from tuneline.stages.render.prompts import load_prompts

    config = params.render
    family = detect_family(params.model, root)
    return load_prompts(Path(root) / config.prompts_file, config, family)[: config.live_prompts]
