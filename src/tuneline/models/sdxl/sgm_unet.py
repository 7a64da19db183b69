"""diffusers UNet module names -> the original Stability (SGM / ldm) names, from the UNet config.

The SGM UNet is a flat list of `input_blocks`, one `middle_block` and `output_blocks`:
input block 0 is conv_in, then each diffusers down block contributes `layers_per_block`
entries (`.0` resnet, `.1` attention if the block has one) plus one downsampler entry
(`.0.op`); output blocks hold `layers_per_block + 1` entries per up block, the upsampler
sits beside the last resnet (`.1.conv`, or `.2.conv` when that entry has an attention).
This is the exact inverse of the arithmetic in diffusers' `convert_ldm_unet_checkpoint`
and `_maybe_map_sgm_blocks_to_diffusers`, so anything these names describe loads back.

Known gap in diffusers (not here): for an up block WITHOUT attention that has an upsampler
(SD 1.x layout, not SDXL), `_maybe_map_sgm_blocks_to_diffusers` reads the kohya LoRA name
`output_blocks_N_1_conv` as `attentions`; ComfyUI/A1111 read the SGM name correctly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuneline.models.export import UnmappedKeyError

# Resnet children: diffusers name -> SGM name (inverse of update_unet_resnet_ldm_to_diffusers).
RESNET_CHILDREN = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Top-level modules (DIFFUSERS_TO_LDM_MAPPING["unet"]).
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_LABEL_EMBEDDING = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}
# Transformer (attention) children keep their names in SGM; only these exist in an SDXL UNet.
# Anything else (IP-adapter processors, extra adapters) has no place in the SGM layout.
_ATTENTION_CHILD = re.compile(
    r"norm|proj_in|proj_out|transformer_blocks\.\d+\."
    r"(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
)


def load_unet_config(config: Any) -> dict[str, Any]:
    """A plain dict from a diffusers config object, a mapping, a config.json path or its folder."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        return json.loads(path.read_text("utf-8"))
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "config"):  # a model
        return dict(config.config)
    raise TypeError(f"expected a UNet config (mapping, config.json path or model), got {type(config).__name__}")


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def sgm_module_prefixes(config: Any) -> dict[str, tuple[str, str]]:
    """diffusers module prefix -> (SGM prefix, kind); kind says how the children are renamed.

    kinds: "resnet" (RESNET_CHILDREN), "attention" (children keep their names),
    "downsample" (`conv` -> `op`), "upsample" (`conv` stays), "leaf" (no children).
    """
    cfg = load_unet_config(config)
    per_block = cfg.get("layers_per_block", 2)
    if not isinstance(per_block, int):
        raise ValueError(f"layers_per_block={per_block!r}: the SGM layout needs one int for all blocks")
    down_types = list(cfg["down_block_types"])
    up_types = list(cfg["up_block_types"])
    prefixes: dict[str, tuple[str, str]] = {name: (sgm, "leaf") for name, sgm in _TOP_LEVEL.items()}
    for embedding in ("class_embedding", "add_embedding"):
        for child, sgm in _LABEL_EMBEDDING.items():
            prefixes[f"{embedding}.{child}"] = (sgm, "leaf")

    index = 1  # input_blocks.0 is conv_in
    for block, block_type in enumerate(down_types):
        for layer in range(per_block):
            prefixes[f"down_blocks.{block}.resnets.{layer}"] = (f"input_blocks.{index}.0", "resnet")
            if _has_attention(block_type):
                prefixes[f"down_blocks.{block}.attentions.{layer}"] = (f"input_blocks.{index}.1", "attention")
            index += 1
        if block < len(down_types) - 1:  # diffusers: add_downsample = not is_final_block
            prefixes[f"down_blocks.{block}.downsamplers.0"] = (f"input_blocks.{index}.0", "downsample")
            index += 1

    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type == "UNetMidBlock2DCrossAttn":
        prefixes["mid_block.resnets.0"] = ("middle_block.0", "resnet")
        prefixes["mid_block.attentions.0"] = ("middle_block.1", "attention")
        prefixes["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    elif mid_type is not None:
        raise ValueError(f"mid_block_type={mid_type!r} has no SGM layout here (supported: UNetMidBlock2DCrossAttn)")

    index = 0
    for block, block_type in enumerate(up_types):
        for layer in range(per_block + 1):
            prefixes[f"up_blocks.{block}.resnets.{layer}"] = (f"output_blocks.{index}.0", "resnet")
            if _has_attention(block_type):
                prefixes[f"up_blocks.{block}.attentions.{layer}"] = (f"output_blocks.{index}.1", "attention")
            index += 1
        if block < len(up_types) - 1:  # the upsampler shares the block's last entry
            slot = 2 if _has_attention(block_type) else 1
            prefixes[f"up_blocks.{block}.upsamplers.0"] = (f"output_blocks.{index - 1}.{slot}", "upsample")
    return prefixes


def unet_module_to_sgm(module: str, prefixes: Mapping[str, tuple[str, str]]) -> str:
    """SGM module path for a diffusers UNet module path (no `.weight`); raises UnmappedKeyError."""
    parts = module.split(".")
    for size in (4, 3, 2, 1):
        head = ".".join(parts[:size])
        if head not in prefixes:
            continue
        sgm, kind = prefixes[head]
        rest = parts[size:]
        if kind == "leaf" and not rest:
            return sgm
        if kind == "attention" and _ATTENTION_CHILD.fullmatch(".".join(rest)):
            return ".".join([sgm, *rest])
        if kind == "resnet" and len(rest) == 1 and rest[0] in RESNET_CHILDREN:
            return f"{sgm}.{RESNET_CHILDREN[rest[0]]}"
        if kind == "downsample" and rest == ["conv"]:
            return f"{sgm}.op"
        if kind == "upsample" and rest == ["conv"]:
            return f"{sgm}.conv"
        break
    raise UnmappedKeyError(f"UNet module {module!r} has no SGM name for this UNet config")


def unet_key_to_sgm(key: str, prefixes: Mapping[str, tuple[str, str]]) -> str:
    """SGM parameter name for a diffusers UNet parameter name (`<module>.<weight|bias>`)."""
    module, _, param = key.rpartition(".")
    if not module:
        raise UnmappedKeyError(f"UNet parameter {key!r} has no SGM name")
    return f"{unet_module_to_sgm(module, prefixes)}.{param}"
