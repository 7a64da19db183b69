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
from typing import TYPE_CHECKING, Any

from tuneline.core.fsutil import atomic_path
from tuneline.core.logs import quiet_libraries
from tuneline.models.config import ModelConfig
from tuneline.stages.render.prompts import RenderPrompt
from tuneline.train.output import LORA_FILE, PIPELINE_DIR, choose_weights, read_trainer_state

if TYPE_CHECKING:
    from tuneline.models.base import Family
    from tuneline.stages.render.embeds import PromptEmbeddings

log = logging.getLogger(__name__)

WEIGHTS_RECORD = "weights.json"  # renders/final/weights.json: which trained weights the final images show
ADAPTER_NAME = "trained"


def save_png(image: Any, path: Path) -> Path:
    """Write a PIL image atomically (a killed render never leaves a truncated PNG)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def load_base_pipeline(model_config: ModelConfig, root: Path | None, device: str = "auto", dtype: str = "auto",
                       family: Family | None = None, text_encoders: bool = True) -> Any:
    """The base pipeline of `model_config` (model.vae swapped in when set), on `device`: the family's
    text-to-image pipeline (RenderFacts.pipeline); `family` None detects it. Without `text_encoders` its
    text encoders (RenderFacts.text_encoders) are not loaded: it renders from cached prompt embeddings. With
    model.quantize its denoiser and text encoders are quantized before they move to the device."""
    quiet_libraries()  # before the import: it warns while importing
    import diffusers

    from tuneline.models.family import family_of
    from tuneline.models.loading import _base_location, load_vae, resolve_device, resolve_dtype, torch_dtype
    from tuneline.models.quantize import quantize_pipeline

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    base = _base_location(model_config, root)
    kwargs: dict[str, Any] = {}
    if isinstance(base, str) and model_config.revision:
        kwargs["revision"] = model_config.revision
    if model_config.vae:
        kwargs["vae"] = load_vae(model_config, root, dtype, device)
    family = family or family_of(model_config, root)
    spec = family.render
    if not text_encoders:
        kwargs.update(dict.fromkeys(spec.text_encoders))  # None: diffusers loads no such component
    pipeline = getattr(diffusers, spec.pipeline).from_pretrained(base, dtype=torch_dtype(dtype), **kwargs)
    quantize_pipeline(pipeline, model_config.quantize, family.full_precision, device)
    if device != "cpu":  # loaded on the CPU; moving there again only makes diffusers warn
        with _quiet_diffusers():
            pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def family_of_pipeline(pipeline: Any) -> Family:
    """The family of a built pipeline (by its class, as detection reads model_index.json)."""
    from tuneline.models.family import FAMILY_NAMES, PIPELINE_FAMILIES, get_family

    name = type(pipeline).__name__
    if name not in PIPELINE_FAMILIES:
        raise KeyError(f"{name} is no pipeline of a known family ({', '.join(FAMILY_NAMES)})")
    return get_family(PIPELINE_FAMILIES[name])


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


def apply_trained(pipeline: Any, trained_dir: Path, lora_scale: float = 1.0, use_ema: bool = False,
                  weights: str = "final") -> Applied:
    """Put the trained result on `pipeline`: full components from <dir>/pipeline, then the LoRA at `lora_scale`.

    The family's components (RenderFacts.full_components), each of the class its saved folder names;
    then the scheduler settings training learned, as the family's renderer gives them from
    trainer_state.json (a prediction type, a noise schedule; none for a family that has neither).
    """
    family = family_of_pipeline(pipeline)
    spec = family.render
    applied = Applied()
    notes = applied.loaded
    source = applied.source = choose_weights(trained_dir, use_ema, applied.warnings, weights, "render.weights")
    state = read_trainer_state(trained_dir)
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
        from tuneline.models.lycoris import TITLES, load_trained_lora

        with _quiet_diffusers():  # a LoHa / LoKr (train.lora.type) through PEFT: diffusers loads LoRAs only
            kind = load_trained_lora(pipeline, lora, ADAPTER_NAME)
        pipeline.set_adapters([ADAPTER_NAME], adapter_weights=[lora_scale])
        notes.append(f"{TITLES[kind]} {lora} at scale {lora_scale}")
    config = pipeline.scheduler.config
    prediction_type = state.get("prediction_type") or train.get("prediction_type") or config.get("prediction_type")
    settings = family.build_renderer().scheduler_settings(prediction_type, bool(train.get("zero_terminal_snr")))
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
                   path_of: Any = None, embedded: PromptEmbeddings | None = None) -> list[Path]:
    """Render each prompt to <out_dir>/<prefix><index>.png (or `path_of(prompt)`) with its own sampler
    and seeded generator; with `embedded`, from the cached prompt embeddings (the same images)."""
    import torch

    from tuneline.stages.render.samplers import build_scheduler

    out_dir = Path(out_dir) if out_dir is not None else None
    family = family_of_pipeline(pipeline)
    renderer = family.build_renderer()
    base_scheduler = pipeline.scheduler
    paths = []
    try:
        for prompt in prompts:
            pipeline.scheduler = build_scheduler(prompt.sampler, base_scheduler.config, prompt.karras, family)
            generator = torch.Generator("cpu").manual_seed(prompt.seed)  # CPU noise: the same on every device
            texts = renderer.text_inputs(pipeline, prompt.prompt, prompt.negative_prompt, prompt.guidance_scale,
                                         embedded)
            image = pipeline(
                **texts, height=prompt.height, width=prompt.width, num_inference_steps=prompt.steps,
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


def pipeline_from_training(adapter: Any, modules: dict[str, Any], vae: Any = None, text_encoders: bool = True) -> Any:
    """A pipeline of the adapter's family sharing the live training modules (no copies), built by the
    family's renderer.

    `modules` is the trainer's name -> (possibly accelerate-prepared) module dict: the denoiser
    (PEFT-wrapped in LoRA mode) and any trained text encoders; frozen encoders and the tokenizers
    come from the adapter (which loads them on the denoiser's device if training did not need
    them). Under mixed precision the frozen weights are in its compute dtype: render under the
    training's autocast. `vae` defaults to model.vae / the base VAE in fp32 on the denoiser's
    device (load it once and pass it in to avoid reloading at every evaluation). Without
    `text_encoders` the pipeline has none: it renders from cached prompt embeddings only.
    """
    from tuneline.models.family import get_family

    quiet_libraries()  # before the import: it warns while importing
    live = {name: _unwrap(module) for name, module in modules.items()}
    return get_family(adapter.family).build_renderer().pipeline_from_training(adapter, live, vae, text_encoders)


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
                  tracker: Any = None, embedded: PromptEmbeddings | None = None) -> list[Path]:
    """Render `prompts` to <out_dir>/step_<step:06d>/<i>.png without disturbing training (from their
    cached embeddings `embedded` when given).

    Global RNG streams and train/eval flags are restored afterwards; everything runs under
    torch.inference_mode, so no graph and no gradient is touched. Call it on the main
    process only. With `tracker`, each image is also logged as live/step_<step>/<i>.png.
    """
    import torch

    modules = [c for c in pipeline.components.values() if isinstance(c, torch.nn.Module)]
    with preserved_training_state(modules), torch.inference_mode():
        paths = render_prompts(pipeline, prompts, live_step_dir(out_dir, step), embedded=embedded)
    if tracker is not None:
        from PIL import Image

        for path in paths:
            with Image.open(path) as image:
                tracker.log_image(image.copy(), f"live/{path.parent.name}/{path.name}")
    return paths


def live_prompt_embeddings(params: Any, root: Path,
                           prompts: Sequence[RenderPrompt]) -> tuple[PromptEmbeddings | None, str]:
    """The cached embeddings of the live prompts (the latents stage's data/prompt_embeds), or None and why
    the live samples encode with the text encoders ("" when that is expected: trained text encoders)."""
    from tuneline.core import layout
    from tuneline.models.family import family_of
    from tuneline.stages.render.embeds import cached_prompt_embeddings, needed_texts

    if params.train.train_text_encoders:  # the trained encoders make the prompts of their samples
        return None, ""
    texts = needed_texts((prompt.prompt, prompt.negative_prompt) for prompt in prompts)
    # Any dtype: training itself conditions on the cached captions of the same latents run.
    return cached_prompt_embeddings(Path(root) / layout.PROMPT_EMBEDS, family_of(params.model, root), params.model,
                                    root, texts)


def live_prompts(params: Any, root: Path) -> list[RenderPrompt]:
    """The first render.live_prompts prompts of the prompts file (what live evaluation renders), with the
    render defaults of model.base's variant."""
    from tuneline.models.family import family_of
    from tuneline.models.variant import resolve_variant
    from tuneline.stages.render.prompts import load_prompts

    config = params.render
    family = family_of(params.model, root)
    variant = resolve_variant(params.model, family, root).variant
    return load_prompts(Path(root) / config.prompts_file, config, family, variant)[: config.live_prompts]
