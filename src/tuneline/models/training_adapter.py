"""`model.training_adapter`: a LoRA active in the frozen denoiser during training steps only.

A step-distilled model (Z-Image-Turbo) is trained with a de-distilling LoRA on top of it (ai-toolkit's
assistant LoRA, ostris/zimage_turbo_training_adapter; musubi-tuner's --base_weights; SimpleTuner's
assistant_lora), so the trained LoRA learns the concept and not the undoing of the distillation; the
result is the trained LoRA alone, used on the plain model. Here the adapter is loaded as a second PEFT
adapter of the denoiser (diffusers' <Pipeline>.lora_state_dict + denoiser.load_lora_adapter: any layout
diffusers reads, diffusers, kohya or ComfyUI), frozen, and active together with the trained LoRA at
`scale`. Kept apart instead of merged into the weights, it is exact (nothing to subtract afterwards) and
works on a quantized base. It is never in the result:

- the trained LoRA is saved by its own adapter name (`get_peft_model_state_dict(..., "default")`), and
  checkpoints, the optimizer and the EMA hold trained parameters only (requires_grad): it has none;
- live samples switch it off while rendering (`training_adapter_off`), the final render and export use the
  saved LoRA on the plain base;
- train.mode full is refused with it: the adapter would end up in the saved weights.

Its identity (the file's content digest, or id@revision/weight_name on the hub) is part of the train run
key and of models/identity; the latents and text caches do not depend on it (it changes the denoiser only).
A hub adapter is downloaded only because model.training_adapter names it, and only with weight_name and a
pinned 40-hex revision; safetensors only (no pickle).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.core.params import ParamsError

if TYPE_CHECKING:
    from tuneline.core.store import FileDigests
    from tuneline.models.base import Family
    from tuneline.models.config import ModelConfig, TrainingAdapterConfig

log = logging.getLogger(__name__)

KEY = "model.training_adapter"
ADAPTER_NAME = "training_adapter"  # its PEFT adapter name in the denoiser (the trained LoRA is "default")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class AdapterSource:
    """Where the adapter file is: `local` (a file on disk), or `weight_name` in hub repository `repo` at `revision`."""

    local: Path | None = None
    repo: str | None = None
    weight_name: str | None = None
    revision: str | None = None
    tiny: bool = False


def _looks_local(ref: str) -> bool:
    return (ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or "\\" in ref
            or ref.lower().endswith((_SUFFIX, ".ckpt", ".pt", ".bin", ".pth")))


def resolve_source(config: TrainingAdapterConfig, root: Path | None) -> AdapterSource:
    """The adapter's file; ParamsError naming the key for a missing file, a non-safetensors file, a hub id
    without weight_name or a pinned revision."""
    from tuneline.tiny.training_adapter import tiny_training_adapter_file

    ref = config.ref
    tiny = tiny_training_adapter_file(ref)
    if tiny is not None:
        return AdapterSource(local=tiny, tiny=True)
    path = Path(ref).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    folder = path.is_dir()
    if folder:
        if not config.weight_name:
            raise ParamsError(f"{KEY}.ref: {ref!r} is a folder; set {KEY}.weight_name to the LoRA file in it")
        path = path / config.weight_name
    elif path.exists() and config.weight_name:
        raise ParamsError(f"{KEY}.weight_name: {config.weight_name!r} is set, but {KEY}.ref {ref!r} is a file; "
                          "weight_name names the file in a hub repository or a folder")
    if path.is_file():
        if path.suffix.lower() != _SUFFIX:
            raise ParamsError(f"{KEY}.ref: {ref!r} is not a .safetensors file (a pickle could run code when loaded); "
                              "convert it to safetensors")
        return AdapterSource(local=path)
    if folder or path.exists() or _looks_local(ref):
        raise ParamsError(f"{KEY}.ref: {ref!r} is not a LoRA file (looked for {path})")
    # A hub id: downloaded only because it is named, and only a pinned safetensors file.
    problems = []
    if not config.weight_name:
        problems.append(f"{KEY}.weight_name: hub id {ref!r} needs the file to load, e.g. "
                        "zimage_turbo_training_adapter_v2.safetensors")
    elif not config.weight_name.lower().endswith(_SUFFIX):
        problems.append(f"{KEY}.weight_name: {config.weight_name!r} is not a .safetensors file (a pickle could run "
                        "code when loaded)")
    if not config.revision or not _COMMIT.match(config.revision):
        problems.append(f"{KEY}.revision: {config.revision!r}; hub id {ref!r} needs a pinned commit (40 hex digits): "
                        "a training adapter changes what is learned, so it is pinned like a cache key")
    if problems:
        raise ParamsError("; ".join(problems))
    return AdapterSource(repo=ref, weight_name=config.weight_name, revision=config.revision)


def problems(model: ModelConfig, train_mode: str, root: Path | None) -> list[str]:
    """Every problem of model.training_adapter with these settings, one line each (for preflight)."""
    config = model.training_adapter
    if config is None:
        return []
    found = []
    if train_mode != "lora":
        found.append(f"{KEY}: set with train.mode {train_mode!r}; a training adapter needs train.mode lora (in a full "
                     "fine-tune it would end up in the saved weights)")
    try:
        resolve_source(config, root)
    except ParamsError as error:
        found.append(str(error))
    return found


def adapter_identity(config: TrainingAdapterConfig, root: Path | None, digests: FileDigests | None = None) -> str:
    """The adapter's identity: its file's content digest, or id@revision/weight_name on the hub."""
    from tuneline.core.fsutil import digest_json
    from tuneline.models.ref import model_identity

    source = resolve_source(config, root)
    if source.local is not None:
        return model_identity(str(source.local), root=root, digests=digests)
    return digest_json({"hub": source.repo, "revision": source.revision, "weight_name": source.weight_name})


def identity_entry(model: ModelConfig, root: Path) -> dict[str, dict[str, Any]]:
    """{KEY: {ref, revision, weight_name, kind, identity}} when model.training_adapter is set (the models
    stage records it beside tuneline.models.ref.identify's entries), else {}."""
    config = model.training_adapter
    if config is None:
        return {}
    source = resolve_source(config, root)
    kind = "tiny (RANDOM weights)" if source.tiny else "hub" if source.repo else "local"
    return {KEY: {"ref": config.ref, "revision": config.revision, "weight_name": config.weight_name, "kind": kind,
                  "identity": adapter_identity(config, root)}}


# --- in the denoiser under training ------------------------------------------------------------------


def _tuner_layers(module: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]


def _set_active(module: Any, names: list[str]) -> None:
    """Activate exactly `names` in every PEFT layer of `module`, leaving every requires_grad as it was (PEFT's
    set_adapter marks active adapters trainable: the training adapter must stay frozen)."""
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    for layer in _tuner_layers(module):
        layer.set_adapter(names)
    for parameter, flag in flags:
        parameter.requires_grad_(flag)


def _on_disk(source: AdapterSource) -> Path | None:
    """The adapter file if it is on this machine: a local file, or a hub file already in the HF cache."""
    if source.local is not None:
        return source.local
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.repo, source.weight_name, revision=source.revision)  # type: ignore[arg-type]
    return Path(found) if isinstance(found, str) else None


def _shapes_only(file: Path) -> dict[str, Any]:
    """The file's tensors on the meta device (shapes and dtypes from its header), scalars (alphas) read for real."""
    import torch
    from safetensors import safe_open

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    tensors = {}
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():
            part = handle.get_slice(key)
            shape = part.get_shape()
            if len(shape) == 0 or shape == [1] or part.get_dtype() not in dtypes:
                tensors[key] = handle.get_tensor(key)  # an alpha: the loaders read its value
            else:
                tensors[key] = torch.empty(shape, dtype=dtypes[part.get_dtype()], device="meta")
    return tensors


def _state_dict(family: Family, denoiser: Any, source: AdapterSource,
                tensors: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any, Any]:
    """(state dict with the denoiser's prefix, network alphas, adapter metadata) as the family's pipeline reads
    the file, or `tensors` read from it (its lora_state_dict converts kohya / ComfyUI layouts)."""
    import diffusers

    pipeline = getattr(diffusers, family.render.pipeline)
    kwargs: dict[str, Any] = {"use_safetensors": True, "return_lora_metadata": True}
    if family.render.denoiser == "unet":
        kwargs["unet_config"] = denoiser.config  # maps kohya's SGM block names, as load_lora_weights passes it
    if tensors is not None:
        loaded = pipeline.lora_state_dict(tensors, **kwargs)
    elif source.local is not None:
        loaded = pipeline.lora_state_dict(str(source.local.parent), weight_name=source.local.name,
                                          local_files_only=True, **kwargs)
    else:
        loaded = pipeline.lora_state_dict(source.repo, weight_name=source.weight_name, revision=source.revision,
                                          **kwargs)
    # (state_dict, network_alphas, metadata) from a loader with network alphas (SDXL's), else (state_dict, metadata)
    state_dict, metadata = loaded[0], loaded[-1]
    alphas = loaded[1] if len(loaded) == 3 else None
    return state_dict, alphas, metadata


def load_training_adapter(family: Family, denoiser: Any, model: ModelConfig, train_mode: str,
                          root: Path | None) -> dict[str, Any] | None:
    """Load model.training_adapter into `denoiser` (after the trained LoRA was added) as a frozen second adapter,
    active with the trained one at its scale. Leaves every RNG stream as it was, so the trained LoRA starts from
    the same draws with or without it. None when no adapter is set; else what was loaded (for reports).

    On the meta device (the memory estimate builds the model without weights) the adapter's layers are made
    from the file's header alone (nothing read or allocated), so the estimate counts them; a hub file not
    downloaded yet is left out then (with a log line)."""
    import torch

    config = model.training_adapter
    if config is None:
        return None
    if train_mode != "lora":
        raise ParamsError(problems(model, train_mode, root)[0])
    source = resolve_source(config, root)
    meta = any(parameter.device.type == "meta" for parameter in denoiser.parameters())
    tensors = None
    if meta:
        file = _on_disk(source)
        if file is None:
            log.warning("%s %s@%s/%s is not downloaded yet: the memory estimate leaves its weights out", KEY,
                        source.repo, source.revision, source.weight_name)
            return None
        tensors = _shapes_only(file)
    prefix = family.render.denoiser
    state_dict, alphas, metadata = _state_dict(family, denoiser, source, tensors)
    foreign = sorted({key.split(".")[0] for key in state_dict if not key.startswith(f"{prefix}.")})
    if foreign:
        raise ParamsError(f"{KEY}: {config.ref!r} also holds LoRA weights for {', '.join(foreign)}; a training "
                          f"adapter changes the {prefix} only (the cached text embeddings do not depend on it): use a "
                          f"{prefix}-only LoRA")
    trained = list(denoiser.active_adapters())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # PEFT draws the new layers' init first
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # a second adapter: on purpose
        denoiser.load_lora_adapter(state_dict, prefix=prefix, network_alphas=alphas, adapter_name=ADAPTER_NAME,
                                   metadata=metadata, low_cpu_mem_usage=meta)  # meta: the header's shapes, assigned
    loaded = [(name, p) for name, p in denoiser.named_parameters() if f".{ADAPTER_NAME}." in name]
    if len(loaded) != len(state_dict):
        raise ParamsError(f"{KEY}: {config.ref!r}: {len(state_dict) - len(loaded)} of its {len(state_dict)} tensors "
                          f"fit no layer of the {family.title} {prefix}; is it a LoRA for this model?")
    for _, parameter in loaded:
        parameter.requires_grad_(False)
    _set_active(denoiser, [*trained, ADAPTER_NAME])
    for layer in _tuner_layers(denoiser):
        if ADAPTER_NAME in getattr(layer, "scaling", {}):
            layer.set_scale(ADAPTER_NAME, config.scale)
    return {"ref": config.ref, "tensors": len(loaded), "scale": config.scale,
            "file": str(source.local) if source.local else f"{source.repo}@{source.revision}/{source.weight_name}"}


@contextlib.contextmanager
def training_adapter_off(modules: Iterable[Any]) -> Iterator[None]:
    """The training adapter inactive in `modules` (e.g. a live-sample pipeline's components) inside the body,
    as it was after; modules without one are left alone. Live samples show the model users will get."""
    import torch

    switched: list[tuple[Any, list[str]]] = []
    for module in modules:
        if not isinstance(module, torch.nn.Module) or not any(
                ADAPTER_NAME in layer.active_adapters for layer in _tuner_layers(module)):
            continue
        active = list(_tuner_layers(module)[0].active_adapters)
        _set_active(module, [name for name in active if name != ADAPTER_NAME])
        switched.append((module, active))
    try:
        yield
    finally:
        for module, active in switched:
            _set_active(module, active)
