"""A diffusers SDXL pipeline folder -> one SDXL checkpoint in the original (SGM / ldm) layout.

    model.diffusion_model.*                       UNet, SGM block names (from the UNet config)
    first_stage_model.*                           VAE, ldm names; mid attention as 1x1 convs
    conditioner.embedders.0.transformer.text_model.*   CLIP-L, HF names
    conditioner.embedders.1.model.*               OpenCLIP bigG names (fused qkv, text_projection as x @ P)
    v_pred, ztsnr                                 empty marker tensors of a v-prediction / zero-terminal-SNR
                                                  model (from the folder's scheduler config)

Each mapping inverts what diffusers' single-file loader reads (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`).
Every input tensor gets a name or the export raises: nothing is dropped silently.

`vae_to_single_file` writes a VAE alone the way standalone VAE files are (sdxl_vae.safetensors,
sdxl-vae-fp16-fix): the same ldm names without the `first_stage_model.` prefix, which ComfyUI's
Load VAE node and A1111's VAE folder read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from tuneline.core.tensorfile import check_header
from tuneline.models.sdxl.sgm_unet import UnmappedKeyError, sgm_module_prefixes, unet_key_to_sgm

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
DTYPES = ("fp16", "bf16", "fp32")

# Buffers HF keeps in some state dicts that the ldm layout does not have (recomputed on load).
_IGNORABLE_TEXT_KEYS = {"embeddings.position_ids"}


# --- reading a diffusers folder -----------------------------------------------------------------

def _load_component(folder: Path) -> dict[str, Any]:
    """All tensors of one component folder: single file, sharded (index.json) or legacy .bin."""
    from safetensors.torch import load_file

    for stem in ("diffusion_pytorch_model", "model"):
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return load_file(str(single))
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
            tensors: dict[str, Any] = {}
            for shard in shards:
                tensors.update(load_file(str(folder / shard)))
            return tensors
        legacy = folder / f"{stem}.bin"
        if legacy.is_file():
            import torch

            return torch.load(legacy, map_location="cpu", weights_only=True)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "folder missing"
    raise FileNotFoundError(f"no weights in {folder} (looked for *.safetensors, sharded index or .bin; found {found})")


def _read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text("utf-8"))


# --- per-component mappings ---------------------------------------------------------------------

def unet_to_sgm(state_dict: Mapping[str, Any], unet_config: Any) -> dict[str, Any]:
    """diffusers UNet tensors -> `model.diffusion_model.*` tensors."""
    prefixes = sgm_module_prefixes(unet_config)
    return {UNET_PREFIX + unet_key_to_sgm(key, prefixes): value for key, value in state_dict.items()}


_VAE_TOP = {
    "conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}


def _vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        raise UnmappedKeyError(f"VAE key {key!r} has no ldm name")
    module, _, param = rest.rpartition(".")
    if module in _VAE_TOP:
        return f"{coder}.{_VAE_TOP[module]}.{param}"
    patterns = (
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", lambda m: f"down.{m[1]}.block.{m[2]}.{_VAE_RESNET[m[3]]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda m: f"down.{m[1]}.downsample.conv"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda m: f"up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.{_VAE_RESNET[m[3]]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv", lambda m: f"up.{num_up_blocks - 1 - int(m[1])}.upsample.conv"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)", lambda m: f"mid.block_{int(m[1]) + 1}.{_VAE_RESNET[m[2]]}"),
        (r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)",
         lambda m: f"mid.attn_1.{_VAE_ATTENTION[m[1]]}"),
    )
    wrong_side = "up_blocks" if coder == "encoder" else "down_blocks"
    for pattern, build in patterns:
        match = re.fullmatch(pattern, module)
        if match is None:
            continue
        if module.startswith(wrong_side):
            break
        try:
            return f"{coder}.{build(match)}.{param}"
        except KeyError:
            break
    raise UnmappedKeyError(f"VAE key {key!r} has no ldm name")


def vae_to_ldm(state_dict: Mapping[str, Any], vae_config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers AutoencoderKL tensors -> `first_stage_model.*`; mid attention weights as 1x1 convs."""
    num_up = len(vae_config["up_block_types"])
    out = {}
    for key, value in state_dict.items():
        ldm = _vae_key_to_ldm(key, num_up)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # ldm's attention uses Conv2d(1x1); loaders squeeze it back
        out[VAE_PREFIX + ldm] = value
    return out


def _text_model_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys relative to CLIP's text_model (transformers 5 CLIPTextModel has no `text_model.` prefix)."""
    return {key.removeprefix("text_model."): value for key, value in state_dict.items()
            if key.removeprefix("text_model.") not in _IGNORABLE_TEXT_KEYS}


def clip_l_to_ldm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextModel tensors -> `conditioner.embedders.0.transformer.text_model.*`."""
    out = {}
    for key, value in _text_model_keys(state_dict).items():
        if not key.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
            raise UnmappedKeyError(f"CLIP-L key {key!r} has no place under text_model.")
        out[f"{CLIP_L_PREFIX}text_model.{key}"] = value
    return out


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def open_clip_to_ldm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextModelWithProjection tensors -> OpenCLIP names under `conditioner.embedders.1.model.`.

    q/k/v fuse into `attn.in_proj_*` (q, k, v order) and `text_projection` is stored as the
    matrix P of `x @ P` (the Linear weight transposed): diffusers splits in_proj by
    `text_projection.shape[0]`, which is then the hidden size, as in the real bigG.
    """
    import torch

    keys = _text_model_keys(state_dict)
    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in keys.items():
        if key in _OPEN_CLIP_TOP:
            out[OPEN_CLIP_PREFIX + _OPEN_CLIP_TOP[key]] = value
            continue
        if key == "text_projection.weight":
            out[OPEN_CLIP_PREFIX + "text_projection"] = value.T.contiguous()
            continue
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if match is None:
            raise UnmappedKeyError(f"OpenCLIP key {key!r} has no ldm name")
        layer, module, param = match.groups()
        block = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}."
        projection = re.fullmatch(r"self_attn\.(q|k|v)_proj", module)
        if projection:
            qkv.setdefault((block, param), {})[projection[1]] = value
        elif module in _OPEN_CLIP_LAYER:
            out[f"{block}{_OPEN_CLIP_LAYER[module]}.{param}"] = value
        else:
            raise UnmappedKeyError(f"OpenCLIP key {key!r} has no ldm name")
    for (block, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{block}: need q, k and v projections to fuse in_proj_{param}, found {sorted(parts)}")
        out[f"{block}attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if OPEN_CLIP_PREFIX + "text_projection" not in out:
        raise UnmappedKeyError("text_encoder_2 has no text_projection: not an SDXL OpenCLIP encoder")
    return out


# --- the export -----------------------------------------------------------------------------

def prediction_markers(scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level keys that make a checkpoint load as what it was trained for.

    ComfyUI's SDXL model_type() reads the key `v_pred` (V_PREDICTION) and, with it, `ztsnr`
    (zero terminal SNR sampling); v-pred SDXL checkpoints in the wild carry both as empty
    tensors. Without them every loader samples the model as epsilon.
    """
    import torch

    markers = {}
    if scheduler_config.get("prediction_type") == "v_prediction":
        markers["v_pred"] = torch.tensor([])
    if scheduler_config.get("rescale_betas_zero_snr"):
        markers["ztsnr"] = torch.tensor([])
    return markers


def pipeline_state_dicts(pipeline_dir: Path) -> dict[str, dict[str, Any]]:
    """The four weight sets of an SDXL diffusers folder, read from disk without building models."""
    pipeline_dir = Path(pipeline_dir)
    return {name: _load_component(pipeline_dir / name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}


def sdxl_to_single_file_state_dict(pipeline_dir: Path) -> dict[str, Any]:
    """The whole SDXL checkpoint in SGM / ldm names (tensors as stored, no dtype change), with the
    v_pred / ztsnr markers its scheduler config calls for."""
    pipeline_dir = Path(pipeline_dir)
    weights = pipeline_state_dicts(pipeline_dir)
    unet_config = _read_config(pipeline_dir / "unet")
    parts = (
        unet_to_sgm(weights["unet"], unet_config),
        vae_to_ldm(weights["vae"], _read_config(pipeline_dir / "vae")),
        clip_l_to_ldm(weights["text_encoder"]),
        open_clip_to_ldm(weights["text_encoder_2"]),
    )
    out: dict[str, Any] = {}
    for part in parts:
        clash = out.keys() & part.keys()
        if clash:
            raise ValueError(f"two weights map to the same name: {sorted(clash)[:5]}")
        out.update(part)
    _check_against_diffusers_loader(out, weights, unet_config, _read_config(pipeline_dir / "vae"))
    scheduler = pipeline_dir / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        out.update(prediction_markers(json.loads(scheduler.read_text("utf-8"))))
    return out


def _check_against_diffusers_loader(
    checkpoint: Mapping[str, Any], weights: Mapping[str, Mapping[str, Any]], unet_config: dict, vae_config: dict
) -> None:
    """Run diffusers' own ldm -> diffusers UNet/VAE converters on the result: they must give back every key.

    Pure dict work (no model build), so the inverse is checked on every export, for any config.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for name, back in (("unet", convert_ldm_unet_checkpoint(dict(checkpoint), unet_config)),
                       ("vae", convert_ldm_vae_checkpoint(dict(checkpoint), vae_config))):
        _check_round_trip(name, weights[name], back)


def _check_round_trip(name: str, original: Mapping[str, Any], back: Mapping[str, Any]) -> None:
    missing = original.keys() - back.keys()
    extra = back.keys() - original.keys()
    wrong = [k for k in original.keys() & back.keys() if back[k] is not None and back[k].shape != original[k].shape]
    if missing or extra or wrong:
        raise UnmappedKeyError(
            f"{name}: diffusers' single-file loader would not read this export back "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}, wrong shape {wrong[:3]})")


def pipeline_to_single_file(
    pipeline_dir: Path,
    out_path: Path,
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `pipeline_dir` (a diffusers SDXL folder) as ONE .safetensors checkpoint in the SGM layout.

    Floating tensors are cast to `dtype`; the file is written atomically with `metadata`
    (strings only: see `tuneline.stages.export.metadata.checkpoint_metadata`).
    """
    import torch

    from tuneline.core.tensorfile import save_tensors

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}")
    header = check_header(metadata)
    target = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tensors = {
        key: (value.to(target) if value.is_floating_point() else value).contiguous()
        for key, value in sdxl_to_single_file_state_dict(pipeline_dir).items()
    }
    out_path = Path(out_path)
    save_tensors(tensors, out_path, header)
    return out_path


# --- a VAE alone --------------------------------------------------------------------------------

def vae_single_file_state_dict(state_dict: Mapping[str, Any], vae_config: Mapping[str, Any]) -> dict[str, Any]:
    """An AutoencoderKL's tensors as a standalone VAE file holds them: ldm names (`encoder.down.0.block.0.
    norm1.weight`, `decoder.mid.attn_1.q.weight` as a 1x1 conv, `quant_conv.*`) with no `first_stage_model.`
    prefix. Checked against diffusers' single-file VAE loader, which must give back every key and shape."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    tensors = {key.removeprefix(VAE_PREFIX): value for key, value in vae_to_ldm(state_dict, vae_config).items()}
    _check_round_trip("vae", state_dict, convert_ldm_vae_checkpoint(dict(tensors), dict(vae_config)))
    return tensors


def vae_to_single_file(
    state_dict: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    out_path: Path,
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an AutoencoderKL (its state dict and config) as ONE standalone .safetensors VAE in the ldm
    layout; floating tensors cast to `dtype`, written atomically with `metadata` and a canonical header."""
    import torch

    from tuneline.core.tensorfile import save_tensors

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}")
    header = check_header(metadata)
    target = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tensors = {key: (value.to(target) if value.is_floating_point() else value).contiguous()
               for key, value in vae_single_file_state_dict(state_dict, vae_config).items()}
    out_path = Path(out_path)
    save_tensors(tensors, out_path, header)
    return out_path
