"""Load model components for a stage: where each comes from, in which dtype, on which device.

A component's source is resolved once (`vae_source`, `text_encoder_sources`,
`zimage_text_encoder_sources`) so the same description feeds both the cache key
(`modelref.model_identity`) and the loader: what is hashed is exactly what is loaded.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.core.device import TORCH_DTYPES, resolve_device, resolve_dtype, torch_dtype  # noqa: F401  (moved to core)
from tuneline.core.logs import quiet_libraries
from tuneline.models.config import ModelConfig
from tuneline.core.fsutil import digest_json
from tuneline.models.quantize import quantize_frozen
from tuneline.models.ref import model_identity, resolve_model

# SDXL's conditioning comes from these four subfolders of the base model.
TEXT_COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
# Z-Image's from these two: one tokenizer (Qwen2Tokenizer) and one Qwen3 decoder LM (Qwen3Model).
ZIMAGE_TEXT_COMPONENTS = ("tokenizer", "text_encoder")


@dataclass(frozen=True)
class ComponentSource:
    """One model component: the reference as written in params, and where it loads from."""

    ref: str  # as in params.yaml: what model_identity hashes
    revision: str | None
    subfolder: str | None
    location: Path | str  # local folder, or the hub id
    # For a single-file base: the identity of model.config, whose configs and tokenizers
    # the conversion took (the file's own digest covers the weights).
    config_identity: str | None = None

    def identity(self, root: Path | None) -> str:
        own = model_identity(self.ref, self.revision, self.subfolder, root)
        if self.config_identity is None:
            return own
        return digest_json({"model": own, "config": self.config_identity})

    def load_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.subfolder:
            kwargs["subfolder"] = self.subfolder
        if isinstance(self.location, str) and self.revision:
            kwargs["revision"] = self.revision
        return kwargs


def _base_location(model: ModelConfig, root: Path | None) -> Path | str:
    """Where model.base loads from: a diffusers folder or a hub id.

    A single-file checkpoint is converted once into a cached diffusers folder
    (`models.single_file`), which every loader then reads like any other base folder.
    """
    base = resolve_model(model.base, root)
    if isinstance(base, Path) and base.is_file():
        from tuneline.models.single_file import ensure_converted

        return ensure_converted(base, model, root)
    return base


def _base_config_identity(model: ModelConfig, root: Path | None) -> str | None:
    """model.config's identity when model.base is a single file (it then decides configs and tokenizers)."""
    base = resolve_model(model.base, root)
    if isinstance(base, Path) and base.is_file():
        from tuneline.models.single_file import config_identity

        return config_identity(model, root)
    return None


def vae_source(model: ModelConfig, root: Path | None) -> ComponentSource:
    """model.vae when set (a VAE folder, a pipeline folder holding vae/, or a hub id), else base's vae/."""
    if model.vae:
        location = resolve_model(model.vae, root)
        is_pipeline_folder = (isinstance(location, Path) and not (location / "config.json").is_file()
                              and (location / "vae" / "config.json").is_file())
        return ComponentSource(model.vae, None, "vae" if is_pipeline_folder else None, location)
    return ComponentSource(model.base, model.revision, "vae", _base_location(model, root),
                           _base_config_identity(model, root))


def _base_components(model: ModelConfig, root: Path | None, names: tuple[str, ...]) -> dict[str, ComponentSource]:
    base = _base_location(model, root)
    config = _base_config_identity(model, root)
    return {name: ComponentSource(model.base, model.revision, name, base, config) for name in names}


def text_encoder_sources(model: ModelConfig, root: Path | None) -> dict[str, ComponentSource]:
    """SDXL's two tokenizers and two text encoders, all from model.base."""
    return _base_components(model, root, TEXT_COMPONENTS)


def zimage_text_encoder_sources(model: ModelConfig, root: Path | None) -> dict[str, ComponentSource]:
    """Z-Image's tokenizer and Qwen3 text encoder (subfolders tokenizer/, text_encoder/ of model.base)."""
    return _base_components(model, root, ZIMAGE_TEXT_COMPONENTS)


def load_vae(model: ModelConfig, root: Path | None, dtype: str = "auto", device: str = "auto") -> Any:
    """The AutoencoderKL of `model`, frozen, in eval mode, in `dtype` on `device` (config names, 'auto' allowed)."""
    quiet_libraries()  # before the import: it warns while importing
    from diffusers import AutoencoderKL

    device = resolve_device(device)
    source = vae_source(model, root)
    vae = AutoencoderKL.from_pretrained(source.location, dtype=torch_dtype(resolve_dtype(dtype, device)),
                                        **source.load_kwargs())
    vae.requires_grad_(False)
    return vae.eval().to(device)


def load_text_encoders(model: ModelConfig, root: Path | None, dtype: str = "auto", device: str = "auto",
                       empty_weights: bool = False, quantized: bool = True) -> tuple[list[Any], list[Any]]:
    """([tokenizer, tokenizer_2], [text_encoder, text_encoder_2]) of an SDXL base, encoders frozen in eval mode.

    `empty_weights`: the encoders are built from their configs on the meta device (shapes and
    dtypes only, nothing read or allocated), as the memory estimate needs them. `quantized`: the
    frozen linear layers at model.quantize (tuneline.models.quantize; nothing at 'none'); False for
    a trainer, which quantizes them once it has cast them to its compute dtype.
    """
    quiet_libraries()  # before the import: it warns while importing
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    device = resolve_device(device)
    weights_dtype = torch_dtype(resolve_dtype(dtype, device))
    sources = text_encoder_sources(model, root)
    tokenizers = [CLIPTokenizer.from_pretrained(sources[name].location, **sources[name].load_kwargs())
                  for name in ("tokenizer", "tokenizer_2")]
    encoders = []
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if empty_weights:
            from accelerate import init_empty_weights

            config = cls.config_class.from_pretrained(sources[name].location, **sources[name].load_kwargs())
            with init_empty_weights():
                encoder = cls._from_config(config, dtype=weights_dtype)
        else:
            encoder = cls.from_pretrained(sources[name].location, dtype=weights_dtype, **sources[name].load_kwargs())
        encoder.requires_grad_(False)
        if quantized:  # before the move: full-precision weights never occupy the GPU
            from tuneline.models.sdxl import FAMILY

            quantize_frozen(encoder, model.quantize, keep=FAMILY.full_precision.get(name, ()),
                            device=None if empty_weights else device)
        encoders.append(encoder.eval() if empty_weights else encoder.eval().to(device))
    return tokenizers, encoders


def _pipeline_class(source: ComponentSource, fallback: Any) -> Any:
    """The transformers class that model.base's model_index.json names for `source.subfolder` (what
    the pipeline itself loads), else `fallback` (an Auto class: a hub base, or no model_index.json)."""
    import json

    import transformers

    if not isinstance(source.location, Path) or not source.subfolder:
        return fallback
    try:
        entry = json.loads((source.location / "model_index.json").read_text("utf-8")).get(source.subfolder)
    except (OSError, ValueError, AttributeError):
        return fallback
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers":
        return getattr(transformers, str(entry[1]), fallback)
    return fallback


def load_zimage_text_encoder(model: ModelConfig, root: Path | None, dtype: str = "auto", device: str = "auto",
                             empty_weights: bool = False, quantized: bool = True) -> tuple[Any, Any]:
    """(tokenizer, text_encoder) of a Z-Image base: the Qwen3 encoder frozen, in eval mode, in `dtype` on `device`.
    The one loader of it: the trainer (live encoding, samples) and the text cache both call it.

    The classes are the ones model_index.json names (Qwen2Tokenizer, Qwen3Model), else
    AutoTokenizer / AutoModel (which give the same for a Qwen3 folder). `empty_weights` and
    `quantized`: as for `load_text_encoders`.
    """
    quiet_libraries()  # before the import: it warns while importing
    from transformers import AutoModel, AutoTokenizer

    device = resolve_device(device)
    weights_dtype = torch_dtype(resolve_dtype(dtype, device))
    sources = zimage_text_encoder_sources(model, root)
    tokenizer_source, encoder_source = sources["tokenizer"], sources["text_encoder"]
    tokenizer = _pipeline_class(tokenizer_source, AutoTokenizer).from_pretrained(
        tokenizer_source.location, **tokenizer_source.load_kwargs())
    cls = _pipeline_class(encoder_source, AutoModel)
    if empty_weights:
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(encoder_source.location, **encoder_source.load_kwargs())
        with init_empty_weights():
            encoder = (AutoModel.from_config(config, dtype=weights_dtype) if cls is AutoModel
                       else cls._from_config(config, dtype=weights_dtype))
    else:
        encoder = cls.from_pretrained(encoder_source.location, dtype=weights_dtype, **encoder_source.load_kwargs())
    encoder.requires_grad_(False)
    if quantized:  # before the move: full-precision weights never occupy the GPU
        from tuneline.models.zimage import FAMILY

        quantize_frozen(encoder, model.quantize, keep=FAMILY.full_precision.get("text_encoder", ()),
                        device=None if empty_weights else device)
    return tokenizer, (encoder.eval() if empty_weights else encoder.eval().to(device))


def release(device: str) -> None:
    """Give GPU memory back after the caller dropped its model references, before the next model loads.

    On the CPU reference counting already freed the weights, and a full gc.collect would
    cost ~0.2 s of walking every object that the diffusers/transformers imports created.
    """
    if device.startswith("cuda"):
        import torch

        gc.collect()  # modules in reference cycles hold their CUDA tensors until collected
        torch.cuda.empty_cache()


def host_to_device(tensor: Any, device: Any) -> Any:
    """`tensor` (on the host) on `device`; to CUDA through pinned memory without waiting for the GPU.

    A plain copy from pageable memory waits for everything queued on the stream: one host sync
    per tensor per step. The caching host allocator keeps the pinned block until the copy is done.
    """
    import torch

    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
