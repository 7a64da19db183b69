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

A LoHa / LoKr (train.lora.type, PEFT's LoHa/LoKr layers) keeps the same kohya module names with
LyCORIS' tensor names (tuneline.models.lycoris):

    lora_unet_<...>.hada_w1_a / .hada_w1_b / .hada_w2_a / .hada_w2_b     LoHa
    lora_unet_<...>.lokr_w1 (or .lokr_w1_a / _b), .lokr_w2 (or .lokr_w2_a / _b)   LoKr
    lora_unet_<...>.alpha

the file that LyCORIS' own loader (lycoris.kohya, what sd-scripts and A1111/Forge use) and ComfyUI's
weight adapters read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuneline.models.export import (
    UnmappedKeyError,
    check_header,
    lora_alpha_settings,
    module_alpha,
    read_diffusers_lora,
)
from tuneline.models.lycoris import LYCORIS_SUFFIXES, lycoris_module_tensors, lycoris_part
from tuneline.models.sdxl.sgm_unet import sgm_module_prefixes, unet_module_to_sgm

COMPONENT_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale", *LYCORIS_SUFFIXES)
_PEFT_PARTS = {"lora_A": "down", "lora_B": "up"}
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


def diffusers_lora_to_kohya(state_dict: Mapping[str, Any], alphas: Any, unet_config: Any) -> dict[str, Any]:
    """Convert a diffusers/PEFT SDXL LoRA state dict to kohya tensors.

    state_dict: keys `unet.<module>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.`,
        `text_encoder_2.`), as `StableDiffusionXLPipeline.save_lora_weights` writes them; or a PEFT
        LoHa / LoKr's `unet.<module>.hada_w1_a`, `.lokr_w1`, ... (LyCORIS' names under kohya's).
    alphas: `(rank, alpha)` for all modules, or per component (`unet`, `text_encoder`,
        `text_encoder_2`) a number or PEFT settings (`lora_alpha`, `r`, `alpha_pattern`,
        `use_rslora`); the flat header form (`unet.lora_alpha`, ...) is accepted too.
    unet_config: the base UNet's config (model, mapping or config.json path); decides SGM names.

    Every key is converted or the call raises: nothing is dropped silently.
    """
    import torch

    prefixes = sgm_module_prefixes(unet_config)
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    lycoris: dict[tuple[str, str], dict[str, Any]] = {}
    explicit_alphas: dict[tuple[str, str], float] = {}
    for key, tensor in state_dict.items():
        component, rest = _split_component(key)
        part = lycoris_part(rest)
        if part is not None:
            lycoris.setdefault((component, part[0]), {})[part[1]] = tensor
            continue
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

    stray = set(explicit_alphas) - set(pairs) - set(lycoris)
    if stray:
        raise UnmappedKeyError(f"alpha without LoRA weights for {sorted('.'.join(s) for s in stray)}")

    out: dict[str, Any] = {}
    settings_cache: dict[str, dict[str, Any]] = {}
    for (component, module), parts in sorted(lycoris.items()):
        if (component, module) in pairs:
            raise ValueError(f"{component}.{module}: both LoRA and LoHa/LoKr tensors")
        if component not in settings_cache:
            settings_cache[component] = lora_alpha_settings(alphas, component) or {}
        settings = settings_cache[component]
        if (component, module) in explicit_alphas:
            settings = {**settings, "alpha": explicit_alphas[(component, module)]}
        name = kohya_module_name(component, module, prefixes)
        if f"{name}.alpha" in out:
            raise ValueError(f"two adapted modules map to the kohya name {name!r}")
        converted = lycoris_module_tensors(parts, settings, f"{component}.{module}")
        out.update({f"{name}.{suffix}": value for suffix, value in converted.items()})
    for (component, module), parts in sorted(pairs.items()):
        key = f"{component}.{module}"
        if set(parts) - {"magnitude"} != {"down", "up"}:
            raise ValueError(f"{key}: needs both lora_A and lora_B, found {sorted(parts)}")
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise ValueError(f"{key}: lora_A rank {rank} does not match lora_B shape {tuple(up.shape)}")
        if component not in settings_cache:
            settings_cache[component] = lora_alpha_settings(alphas, component) or {}
        alpha = module_alpha(settings_cache[component], module, rank, explicit_alphas.get((component, module)), key)
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
