"""diffusers/PEFT LoRA -> kohya LoRA (the file ComfyUI, A1111/Forge and diffusers all load).

kohya layout, one entry per adapted module:

    lora_unet_<SGM module path with _>.lora_down.weight   (= PEFT lora_A)
    lora_unet_<...>.lora_up.weight                        (= PEFT lora_B)
    lora_unet_<...>.alpha                                 (0-dim float: the REAL alpha)

with `lora_te1_` (CLIP-L, names under `text_model.`) and `lora_te2_` (OpenCLIP bigG in HF
names) for the text encoders. A DoRA module adds

    lora_<...>.dora_scale                                 (= PEFT lora_magnitude_vector)

shaped (out, 1) for linear and (out, 1, 1, 1) for conv layers: the weight decomposition on
the output axis, as LyCORIS writes it (`wd_on_output`, its default) and as ComfyUI detects
it (`dora_scale.shape[0] == weight.shape[0]`). Merged weight: dora_scale * V / ||V|| per
output row, V = W + alpha/rank * up @ down: PEFT's DoRA exactly, and LyCORIS' merge. (ComfyUI's
output-axis branch still divides by ||W|| instead of ||V||, Comfy-Org/ComfyUI PR #15458; kohya's
own networks.lora ignores dora_scale, so the header names lycoris.kohya as the network.) UNet names use the SGM blocks (`input_blocks_4_1_...`),
derived from the UNet config, so any SDXL-layout UNet gets the names its SGM twin has.

kohya's scale is alpha / rank, PEFT's is lora_alpha / r (or / sqrt(r) with rsLoRA): the
alpha written per module is the one that keeps the effective weight identical.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuneline.core.tensorfile import check_header
from tuneline.models.sdxl.sgm_unet import UnmappedKeyError, sgm_module_prefixes, unet_module_to_sgm

COMPONENT_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")
_PEFT_PARTS = {"lora_A": "down", "lora_B": "up"}
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
# Text encoder modules that live under CLIP's `text_model.` (transformers 5 dropped that
# prefix from CLIPTextModel, CLIPTextModelWithProjection keeps it; kohya always has it).
_TEXT_MODEL_CHILDREN = ("encoder.", "embeddings.", "final_layer_norm")


def _split_component(key: str) -> tuple[str, str]:
    component, _, rest = key.partition(".")
    if component not in COMPONENT_PREFIXES or not rest:
        raise UnmappedKeyError(
            f"LoRA key {key!r} does not start with one of {sorted(COMPONENT_PREFIXES)}: not a diffusers SDXL LoRA")
    return component, rest


def _text_module_name(module: str) -> str:
    bare = module.removeprefix("text_model.")
    if bare.startswith(_TEXT_MODEL_CHILDREN):
        return f"text_model.{bare}"
    if bare == "text_projection":
        return bare
    raise UnmappedKeyError(f"text encoder module {module!r} has no kohya name")


def kohya_module_name(component: str, module: str, unet_prefixes: Mapping[str, tuple[str, str]]) -> str:
    """The kohya LoRA name (`lora_unet_input_blocks_4_1_...`) of one diffusers module."""
    if component == "unet":
        path = unet_module_to_sgm(module, unet_prefixes)
    else:
        path = _text_module_name(module)
    return COMPONENT_PREFIXES[component] + path.replace(".", "_")


def _component_alpha_settings(alphas: Any, component: str) -> dict[str, Any] | None:
    """Normalise `alphas` to PEFT-like settings for one component: lora_alpha, r, alpha_pattern, use_rslora."""
    if isinstance(alphas, (tuple, list)):
        rank, alpha = alphas
        return {"r": int(rank), "lora_alpha": float(alpha), "strict_rank": True}
    if not isinstance(alphas, Mapping):
        raise TypeError("alphas must be (rank, alpha) or a mapping per component (unet, text_encoder, text_encoder_2)")
    if component in alphas:
        value = alphas[component]
        if isinstance(value, (int, float)):
            return {"lora_alpha": float(value)}
        if isinstance(value, Mapping):
            return dict(value)
        raise TypeError(f"alphas[{component!r}] must be a number or a mapping, got {type(value).__name__}")
    # The flat form diffusers writes in the file header: "unet.lora_alpha", "unet.r", ...
    flat = {key.partition(".")[2]: value for key, value in alphas.items() if key.startswith(f"{component}.")}
    return flat or None


def _pattern_value(patterns: Mapping[str, Any] | None, module: str) -> Any:
    # PEFT's get_pattern_key: a pattern matches a module name's tail on a dot boundary.
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _kohya_alpha(settings: dict[str, Any], module: str, rank: int, explicit: float | None, key: str) -> float:
    if explicit is not None:  # a per-module `.alpha` in the source (network_alphas style)
        return float(explicit)
    if settings.get("strict_rank") and rank != settings["r"]:
        raise ValueError(f"{key}: rank {rank} in the weights but alphas says rank {settings['r']}")
    alpha = _pattern_value(settings.get("alpha_pattern"), module)
    alpha = settings.get("lora_alpha") if alpha is None else alpha
    if alpha is None:
        raise ValueError(f"no lora_alpha for {key}: pass alphas explicitly (the file has no adapter metadata)")
    alpha = float(alpha)
    if settings.get("use_rslora"):
        alpha *= math.sqrt(rank)  # PEFT scale alpha/sqrt(r) == kohya scale (alpha*sqrt(r))/r
    return alpha


def diffusers_lora_to_kohya(state_dict: Mapping[str, Any], alphas: Any, unet_config: Any) -> dict[str, Any]:
    """Convert a diffusers/PEFT SDXL LoRA state dict to kohya tensors.

    state_dict: keys `unet.<module>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.`,
        `text_encoder_2.`), as `StableDiffusionXLPipeline.save_lora_weights` writes them.
    alphas: `(rank, alpha)` for all modules, or per component (`unet`, `text_encoder`,
        `text_encoder_2`) a number or PEFT settings (`lora_alpha`, `r`, `alpha_pattern`,
        `use_rslora`); the flat header form (`unet.lora_alpha`, ...) is accepted too.
    unet_config: the base UNet's config (model, mapping or config.json path); decides SGM names.

    Every key is converted or the call raises: nothing is dropped silently.
    """
    import torch

    prefixes = sgm_module_prefixes(unet_config)
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    explicit_alphas: dict[tuple[str, str], float] = {}
    for key, tensor in state_dict.items():
        component, rest = _split_component(key)
        if rest.endswith(".alpha"):
            explicit_alphas[(component, rest.removesuffix(".alpha"))] = float(torch.as_tensor(tensor).item())
            continue
        magnitude = re.fullmatch(r"(.+)\.lora_magnitude_vector(\.weight)?", rest)
        if magnitude is not None:
            pairs.setdefault((component, magnitude.group(1)), {})["magnitude"] = tensor
            continue
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if match is None:
            raise UnmappedKeyError(
                f"LoRA key {key!r} is not a PEFT lora_A/lora_B weight or DoRA magnitude (LoRA bias and other "
                "adapters have no kohya LoRA equivalent)")
        pairs.setdefault((component, match.group(1)), {})[_PEFT_PARTS[match.group(2)]] = tensor

    stray = set(explicit_alphas) - set(pairs)
    if stray:
        raise UnmappedKeyError(f"alpha without LoRA weights for {sorted('.'.join(s) for s in stray)}")

    out: dict[str, Any] = {}
    settings_cache: dict[str, dict[str, Any]] = {}
    for (component, module), parts in sorted(pairs.items()):
        key = f"{component}.{module}"
        if set(parts) - {"magnitude"} != {"down", "up"}:
            raise ValueError(f"{key}: needs both lora_A and lora_B, found {sorted(parts)}")
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise ValueError(f"{key}: lora_A rank {rank} does not match lora_B shape {tuple(up.shape)}")
        if component not in settings_cache:
            settings_cache[component] = _component_alpha_settings(alphas, component) or {}
        alpha = _kohya_alpha(settings_cache[component], module, rank, explicit_alphas.get((component, module)), key)
        name = kohya_module_name(component, module, prefixes)
        if f"{name}.lora_down.weight" in out:
            raise ValueError(f"two LoRA modules map to the kohya name {name!r}")
        out[f"{name}.lora_down.weight"] = down.detach().contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if "magnitude" in parts:
            out[f"{name}.dora_scale"] = _dora_scale(parts["magnitude"], up, key)
    return out


def _dora_scale(magnitude: Any, up: Any, key: str) -> Any:
    """PEFT's magnitude ((out,) linear, (1, out, 1, 1) conv) -> kohya/LyCORIS dora_scale (out, 1[, 1, 1])."""
    out_channels = up.shape[0]
    if magnitude.numel() != out_channels:
        raise ValueError(f"{key}: DoRA magnitude has {magnitude.numel()} values for {out_channels} output channels")
    return magnitude.detach().reshape(out_channels, *[1] * (up.ndim - 1)).contiguous()


def network_dim_and_alpha(tensors: Mapping[str, Any]) -> tuple[str, str]:
    """(ss_network_dim, ss_network_alpha) as kohya writes them: the value, or "Dynamic" when it varies."""
    ranks = {int(v.shape[0]) for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    alphas = {float(v.item()) for k, v in tensors.items() if k.endswith(".alpha")}
    rank = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    alpha = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    return rank, alpha


def save_kohya_lora(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> Path:
    """Write a kohya LoRA .safetensors atomically; refuses keys outside the kohya layout."""
    from tuneline.core.tensorfile import save_tensors

    header = check_header(metadata)
    bad = [k for k in tensors if not (k.startswith(tuple(COMPONENT_PREFIXES.values())) and k.endswith(KOHYA_SUFFIXES))]
    if bad:
        raise UnmappedKeyError(f"not kohya LoRA keys: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    path = Path(path)
    save_tensors({k: v.contiguous() for k, v in tensors.items()}, path, header)
    return path


def read_diffusers_lora(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state dict, adapter settings per component or None) of a diffusers LoRA file or its folder.

    The settings come from the `lora_adapter_metadata` header that `save_lora_weights` writes
    when given `*_lora_adapter_metadata`; without it the file does not say its alpha.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_LORA_FILE
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    raw = header.get("lora_adapter_metadata")
    settings: dict[str, Any] | None = None
    if raw:
        settings = {}
        for key, value in json.loads(raw).items():
            component, _, field = key.partition(".")
            settings.setdefault(component, {})[field] = value
    return load_file(str(path)), settings


def export_kohya_lora(
    diffusers_lora: Path, out_path: Path, unet_config: Any, metadata: Mapping[str, str], alphas: Any = None
) -> Path:
    """Read a diffusers LoRA (file or folder), convert it and write the kohya file with `metadata`."""
    state_dict, settings = read_diffusers_lora(diffusers_lora)
    alphas = alphas if alphas is not None else settings
    if alphas is None:
        raise ValueError(f"{diffusers_lora} has no adapter metadata (lora_alpha); pass alphas=(rank, alpha)")
    tensors = diffusers_lora_to_kohya(state_dict, alphas, unet_config)
    return save_kohya_lora(out_path, tensors, metadata)
