"""What every family's exporter shares: the safetensors header of its files (SAI `modelspec.*` and
tuneline's provenance), reading the training's diffusers LoRA and weights, and the standalone VAE
file in the original (ldm) layout.

The export stage asks the family's exporter (`Family.exporter`, the `Exporter` Protocol in
tuneline.models.contracts, with the ExportedFile and HeaderFacts it speaks of) which files to write and
how; the exporters build their headers and files from the pieces here. A safetensors header holds strings only: every header helper returns
`dict[str, str]`. Importing this module is instant (torch loads inside the functions).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuneline.core.tensorfile import check_header  # noqa: F401  (the exporters import it from here)

MODELSPEC_VERSION = "1.0.1"
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "v": "v"}
DTYPES = ("fp16", "bf16", "fp32")


class UnmappedKeyError(KeyError):
    """A weight name the target layout has no place for: exporting it would silently drop it."""

    def __str__(self) -> str:  # KeyError repr()s its message; keep it readable
        return str(self.args[0]) if self.args else ""


def _iso(moment: _dt.datetime | str) -> str:
    if isinstance(moment, str):
        return moment
    return moment.replace(microsecond=0).isoformat()


def modelspec_metadata(
    *,
    architecture: str,
    title: str,
    implementation: str,
    resolution: tuple[int, int] = (1024, 1024),
    prediction_type: str | None = "epsilon",
    trigger_phrase: str | None = None,
    date: _dt.datetime | str | None = None,
    description: str | None = None,
    implementation_version: str | None = None,
) -> dict[str, str]:
    """SAI model spec 1.0.1 keys, as kohya sd-scripts writes them (ComfyUI / A1111 / SAI tooling read them).

    `prediction_type` None: no such key (a VAE predicts no noise; flow matching has none)."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; expected one of {sorted(PREDICTION_TYPES)}")
    width, height = resolution
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
    }
    if prediction_type is not None:
        meta["modelspec.prediction_type"] = PREDICTION_TYPES[prediction_type]
    if date is not None:  # never "now": an exported file must not change when its inputs do not
        meta["modelspec.date"] = _iso(date)
    optional = {"trigger_phrase": trigger_phrase, "description": description,
                "implementation_version": implementation_version}
    meta.update({f"modelspec.{key}": value for key, value in optional.items() if value})
    return meta


def provenance_metadata(
    *, data_digest: str, params_digest: str, code_version: str, mlflow_run_id: str | None = None,
    git_commit: str = "unknown", git_dirty: bool | None = None,
) -> dict[str, str]:
    """What produced the weights: data set, parameters, code (version, commit, dirty), the MLflow run."""
    return {
        "tuneline.data_digest": data_digest,
        "tuneline.params_digest": params_digest,
        "tuneline.code_version": code_version,
        "tuneline.git_commit": git_commit,
        "tuneline.git_dirty": "unknown" if git_dirty is None else str(git_dirty).lower(),
        "tuneline.mlflow_run_id": mlflow_run_id or "",
    }


def header_metadata(
    *, architecture: str, implementation: str, title: str, data_digest: str, params_digest: str,
    code_version: str, mlflow_run_id: str | None, git_commit: str, git_dirty: bool | None,
    prediction_type: str | None, zero_terminal_snr: bool | None, resolution: tuple[int, int],
    trigger_phrase: str | None, date: _dt.datetime | str | None, extra: Mapping[str, Any] | None,
    description: str | None = None,
) -> dict[str, str]:
    """Every exported file's header: `modelspec.*`, provenance, `tuneline.zero_terminal_snr` (not
    written when None: a VAE, flow matching) and `extra`."""
    # kohya names its implementation version "sd-scripts/<commit>"; the same with our commit.
    implementation_version = f"tuneline/{git_commit if git_commit != 'unknown' else code_version}"
    meta = modelspec_metadata(architecture=architecture, title=title, resolution=resolution,
                              prediction_type=prediction_type, trigger_phrase=trigger_phrase, date=date,
                              description=description, implementation_version=implementation_version,
                              implementation=implementation)
    meta.update(provenance_metadata(data_digest=data_digest, params_digest=params_digest, code_version=code_version,
                                    mlflow_run_id=mlflow_run_id, git_commit=git_commit, git_dirty=git_dirty))
    if zero_terminal_snr is not None:
        meta["tuneline.zero_terminal_snr"] = str(zero_terminal_snr).lower()
    for key, value in (extra or {}).items():
        meta[str(key)] = str(value)
    return meta


# --- reading what training wrote -----------------------------------------------------------------

def load_component(folder: Path) -> dict[str, Any]:
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


def read_diffusers_lora(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state dict, adapter settings per component or None) of a diffusers LoRA file or its folder.

    The settings come from the `lora_adapter_metadata` header that `save_lora_weights` writes
    when given `*_lora_adapter_metadata`; without it the file does not say its alpha.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tuneline.train.output import LORA_FILE

    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
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


def lora_alpha_settings(alphas: Any, component: str) -> dict[str, Any] | None:
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


def module_alpha(settings: dict[str, Any], module: str, rank: int, explicit: float | None, key: str) -> float:
    """The alpha to write for one module so that alpha / rank scales it as training did (PEFT's
    lora_alpha / r, alpha_pattern, rsLoRA's alpha / sqrt(r))."""
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



def check_diffusers_round_trip(name: str, original: Mapping[str, Any], back: Mapping[str, Any]) -> None:
    """UnmappedKeyError unless `back` (diffusers' single-file reader run on our file) has every key and
    shape of `original`."""
    missing = original.keys() - back.keys()
    extra = back.keys() - original.keys()
    wrong = [k for k in original.keys() & back.keys() if back[k] is not None and back[k].shape != original[k].shape]
    if missing or extra or wrong:
        raise UnmappedKeyError(
            f"{name}: diffusers' single-file loader would not read this export back "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}, wrong shape {wrong[:3]})")


# --- the VAE in the original (ldm) layout: SD, SDXL and the 16-channel Flux-lineage VAEs share it ---------

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


def ldm_vae_state_dict(state_dict: Mapping[str, Any], vae_config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers AutoencoderKL tensors -> ldm names (`encoder.down.0.block.0.norm1.weight`, `quant_conv.*`);
    mid attention weights as 1x1 convs."""
    num_up = len(vae_config["up_block_types"])
    out = {}
    for key, value in state_dict.items():
        ldm = _vae_key_to_ldm(key, num_up)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # ldm's attention uses Conv2d(1x1); loaders squeeze it back
        out[ldm] = value
    return out


def vae_single_file_state_dict(state_dict: Mapping[str, Any], vae_config: Mapping[str, Any]) -> dict[str, Any]:
    """An AutoencoderKL's tensors as a standalone VAE file holds them: ldm names (`encoder.down.0.block.0.
    norm1.weight`, `decoder.mid.attn_1.q.weight` as a 1x1 conv, `quant_conv.*`) with no `first_stage_model.`
    prefix. Checked against diffusers' single-file VAE loader, which must give back every key and shape."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    tensors = ldm_vae_state_dict(state_dict, vae_config)
    check_diffusers_round_trip("vae", state_dict, convert_ldm_vae_checkpoint(dict(tensors), dict(vae_config)))
    return tensors


def vae_to_single_file(
    state_dict: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    out_path: Path,
    dtype: str = "fp16",
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
