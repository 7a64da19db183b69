"""Z-Image exports in the layouts ComfyUI loads (and diffusers reads back).

ComfyUI runs Z-Image as a Lumina 2 model (`comfy.ldm.lumina.model.NextDiT`) with the original
Z-Image checkpoint's names. Checked against Comfy-Org/ComfyUI:
- comfy/utils.py `z_image_to_diffusers` (commit 09708eae709a992a5684bed3595ce4d07e705b4e): the
  diffusers -> ComfyUI name map. Per block (`layers.N`, `noise_refiner.N`, `context_refiner.N`):
  `attention.to_q/to_k/to_v` are the row slices [0:dim], [dim:2dim], [2dim:3dim] of the fused
  `attention.qkv`, `attention.to_out.0` is `attention.out`, `attention.norm_q/norm_k` are
  `attention.q_norm/k_norm`; `all_x_embedder.2-1` is `x_embedder`, `all_final_layer.2-1` is
  `final_layer`; every other name is the same.
- comfy/model_detection.py (commit 0b61ce5baa9ea03d8484729b7eb00e77c6fca227): a state dict with
  `cap_embedder.1.weight` and `noise_refiner.0.attention.k_norm.weight` is Lumina 2; dim 3840 makes
  it Z-Image, and `cap_pad_token` must be there (without it, it is taken for Ming-Image).
- comfy/lora.py `model_lora_keys_unet` (commit ec93dcacb96b922f7cb1417b3ba22bccb082df32): for a
  Lumina2 model every diffusers module name of that map is a LoRA key, as
  `diffusion_model.<diffusers module>`, `transformer.<diffusers module>`, `lycoris_<...>` or bare; a
  to_q/to_k/to_v LoRA patches its slice of the fused qkv (an (offset) patch), so no fusing is needed;
  comfy/weight_adapter/lora.py reads `<key>.lora_A.weight` / `.lora_B.weight` / `.alpha`.

Files:
- LoRA: `diffusion_model.<diffusers module>.lora_A.weight` / `.lora_B.weight` (the trained tensors,
  unchanged) and `.alpha` per module (the REAL alpha: ComfyUI scales by alpha / rank). That is also the
  layout of ai-toolkit's Z-Image LoRAs, which diffusers' ZImageLoraLoaderMixin converts on load (it
  folds alpha / rank into the weights: the same image as the training's LoRA file, bit for bit
  when alpha / rank is a power of two, alpha == rank included; within rounding otherwise).
- LoHa / LoKr (train.lora.type): the same `diffusion_model.<diffusers module>` names with LyCORIS'
  tensor names (`.hada_w1_a`, ..., `.lokr_w1`, `.lokr_w2_a`, ..., `.alpha`; tuneline.models.lycoris):
  ComfyUI's `load_lora` tries each of its weight adapters (lora, loha, lokr, ...) on every key of
  the Lumina2 map, so they load as the LoRA does (a to_q/to_k/to_v adapter patches its qkv slice).
  diffusers' Z-Image loader reads LoRA keys only.
- full fine-tune: the transformer alone (ComfyUI's "Load Diffusion Model", models/diffusion_models),
  original names without a prefix, as Comfy-Org/z_image_turbo's split_files/diffusion_models ship it.
  The text encoder (Qwen3) and the VAE are separate files in ComfyUI (models/text_encoders, models/vae).

Every tensor gets a name or the export raises; the conversion is checked by converting back, with
our inverse and with diffusers' `convert_z_image_transformer_checkpoint_to_diffusers` (what
`ZImageTransformer2DModel.from_single_file` reads).
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.models.contracts import ExportedFile, HeaderFacts
from tuneline.models.export import (
    DTYPES,
    UnmappedKeyError,
    check_header,
    header_metadata,
    load_component,
    lora_alpha_settings,
    module_alpha,
    read_diffusers_lora,
)
from tuneline.models.lycoris import LYCORIS_SUFFIXES, lycoris_module_tensors, lycoris_part
from tuneline.models.lycoris import title as lycoris_title

if TYPE_CHECKING:
    from tuneline.models.config import ModelConfig
    from tuneline.train.config import LoraConfig, TrainConfig

LORA_PREFIX = "diffusion_model."
BLOCKS = ("layers", "noise_refiner", "context_refiner")
_QKV = ("to_q", "to_k", "to_v")
# diffusers -> ComfyUI names inside a block (comfy/utils.py z_image_to_diffusers' block_map)
_BLOCK_RENAMES = {"attention.norm_q.": "attention.q_norm.", "attention.norm_k.": "attention.k_norm.",
                  "attention.to_out.0.": "attention.out."}
_BLOCK_SAME = ("attention_norm1.", "attention_norm2.", "ffn_norm1.", "ffn_norm2.", "feed_forward.w1.",
               "feed_forward.w2.", "feed_forward.w3.", "adaLN_modulation.0.")
_TOP_SAME = ("x_pad_token", "cap_pad_token", "cap_embedder.0.", "cap_embedder.1.", "t_embedder.mlp.0.",
             "t_embedder.mlp.2.")
_TOP_RENAMES = (("all_x_embedder.{patch}.", "x_embedder."), ("all_final_layer.{patch}.", "final_layer."))
_BLOCK_KEY = re.compile(rf"({'|'.join(BLOCKS)})\.(\d+)\.(.+)")


def _patch_key(config: Mapping[str, Any]) -> str:
    """'2-1': the one (patch size, frame patch size) ComfyUI's Z-Image has."""
    sizes, frames = list(config.get("all_patch_size", [2])), list(config.get("all_f_patch_size", [1]))
    if len(sizes) != 1 or len(frames) != 1:
        raise UnmappedKeyError(f"a Z-Image transformer with several patch sizes ({sizes}, {frames}) has no "
                               "single-file layout ComfyUI loads (its Z-Image has one: 2-1)")
    return f"{sizes[0]}-{frames[0]}"


def _qkv_sizes(config: Mapping[str, Any]) -> tuple[int, int, int]:
    dim, heads = int(config["dim"]), int(config["n_heads"])
    kv = int(config.get("n_kv_heads") or heads) * (dim // heads)
    return dim, kv, kv


def transformer_to_comfy(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ZImageTransformer2DModel tensors -> the original Z-Image / ComfyUI names (fused qkv)."""
    import torch

    patch = _patch_key(config)
    out: dict[str, Any] = {}
    qkv: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match is not None:
            block, rest = f"{match[1]}.{match[2]}", match[3]
            projection = re.fullmatch(r"attention\.(to_q|to_k|to_v)\.(weight|bias)", rest)
            if projection is not None:
                qkv.setdefault(f"{block}.attention.qkv.{projection[2]}", {})[projection[1]] = value
                continue
            renamed = next((new + rest[len(old):] for old, new in _BLOCK_RENAMES.items() if rest.startswith(old)),
                           rest if rest.startswith(_BLOCK_SAME) else None)
            if renamed is None:
                raise UnmappedKeyError(f"Z-Image transformer key {key!r} has no ComfyUI name")
            out[f"{block}.{renamed}"] = value
            continue
        renamed = next((new + key[len(old.format(patch=patch)):] for old, new in _TOP_RENAMES
                        if key.startswith(old.format(patch=patch))), key if key.startswith(_TOP_SAME) else None)
        if renamed is None:
            raise UnmappedKeyError(f"Z-Image transformer key {key!r} has no ComfyUI name (Z-Image-Omni's siglip "
                                   "parts and other extensions are not in ComfyUI's Z-Image)")
        out[renamed] = value
    for name, parts in qkv.items():
        if set(parts) != set(_QKV):
            raise UnmappedKeyError(f"{name}: needs to_q, to_k and to_v, found {sorted(parts)}")
        out[name] = torch.cat([parts[p] for p in _QKV], dim=0)  # q, k, v row blocks (ComfyUI's offsets)
    return out


def comfy_to_transformer(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `transformer_to_comfy`: ComfyUI / original names -> diffusers names (qkv split)."""
    patch = _patch_key(config)
    sizes = _qkv_sizes(config)
    inverse_block = {new: old for old, new in _BLOCK_RENAMES.items()}
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match is not None:
            block, rest = f"{match[1]}.{match[2]}", match[3]
            fused = re.fullmatch(r"attention\.qkv\.(weight|bias)", rest)
            if fused is not None:
                if value.shape[0] != sum(sizes):
                    raise UnmappedKeyError(f"{key}: {value.shape[0]} rows, expected q+k+v = {sum(sizes)}")
                for name, part in zip(_QKV, value.split(list(sizes), dim=0)):
                    out[f"{block}.attention.{name}.{fused[1]}"] = part
                continue
            renamed = next((new + rest[len(old):] for old, new in inverse_block.items() if rest.startswith(old)),
                           rest if rest.startswith(_BLOCK_SAME) else None)
            if renamed is None:
                raise UnmappedKeyError(f"ComfyUI Z-Image key {key!r} has no diffusers name")
            out[f"{block}.{renamed}"] = value
            continue
        renamed = next((old.format(patch=patch) + key[len(new):] for old, new in _TOP_RENAMES if key.startswith(new)),
                       key if key.startswith(_TOP_SAME) else None)
        if renamed is None:
            raise UnmappedKeyError(f"ComfyUI Z-Image key {key!r} has no diffusers name")
        out[renamed] = value
    return out


def _check_round_trip(original: Mapping[str, Any], back: Mapping[str, Any]) -> None:
    import torch

    missing, extra = original.keys() - back.keys(), back.keys() - original.keys()
    wrong = [k for k in original.keys() & back.keys() if not torch.equal(original[k], back[k])]
    if missing or extra or wrong:
        raise UnmappedKeyError(f"the ComfyUI layout does not convert back (missing {sorted(missing)[:3]}, "
                               f"unexpected {sorted(extra)[:3]}, changed {wrong[:3]})")


def transformer_to_single_file(transformer_dir: Path, out_path: Path, dtype: str = "fp16",
                               metadata: Mapping[str, str] | None = None) -> Path:
    """Write a saved ZImageTransformer2DModel folder (config.json + weights) as ONE .safetensors diffusion
    model in ComfyUI's Z-Image layout; floating tensors cast to `dtype`, written atomically with `metadata`."""
    import json

    import torch

    from tuneline.core.tensorfile import save_tensors

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}")
    header = check_header(metadata)
    transformer_dir = Path(transformer_dir)
    config = json.loads((transformer_dir / "config.json").read_text("utf-8"))
    weights = load_component(transformer_dir)
    converted = transformer_to_comfy(weights, config)
    _check_round_trip(weights, comfy_to_transformer(converted, config))
    # and diffusers' own reader of the original layout (ZImageTransformer2DModel.from_single_file)
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    _check_round_trip(weights, convert_z_image_transformer_checkpoint_to_diffusers(dict(converted)))
    target = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tensors = {key: (value.to(target) if value.is_floating_point() else value).contiguous()
               for key, value in converted.items()}
    return save_tensors(tensors, Path(out_path), header)


# --- LoRA ---------------------------------------------------------------------------------------

def diffusers_lora_to_comfy(state_dict: Mapping[str, Any], alphas: Any) -> dict[str, Any]:
    """A diffusers Z-Image LoRA (`transformer.<module>.lora_A.weight` / `.lora_B.weight`, as
    ZImagePipeline.save_lora_weights writes it) -> `diffusion_model.<module>.lora_A.weight` /
    `.lora_B.weight` / `.alpha` (tensors unchanged; alpha per module from `alphas`: (rank, alpha) or
    the file's adapter settings, alpha_pattern and rsLoRA included). A PEFT LoHa / LoKr
    (`transformer.<module>.hada_w1_a`, ...) keeps LyCORIS' tensor names under the same prefix."""
    import torch

    settings = lora_alpha_settings(alphas, "transformer") or {}
    pairs: dict[str, dict[str, Any]] = {}
    lycoris: dict[str, dict[str, Any]] = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        if component != "transformer":
            raise UnmappedKeyError(f"LoRA key {key!r}: only a transformer LoRA exports for Z-Image (ComfyUI maps "
                                   "no diffusers text-encoder LoRA for it)")
        part = lycoris_part(rest)
        if part is not None:
            lycoris.setdefault(part[0], {})[part[1]] = tensor
            continue
        if "lora_magnitude_vector" in rest:
            raise UnmappedKeyError(f"LoRA key {key!r}: a DoRA does not export for Z-Image (diffusers' Z-Image "
                                   "loader drops dora_scale); train without use_dora")
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if match is None:
            raise UnmappedKeyError(f"LoRA key {key!r} is not a PEFT lora_A/lora_B weight")
        pairs.setdefault(match[1], {})[match[2]] = tensor
    out: dict[str, Any] = {}
    for module, parts in sorted(lycoris.items()):
        if module in pairs:
            raise ValueError(f"transformer.{module}: both LoRA and LoHa/LoKr tensors")
        converted = lycoris_module_tensors(parts, settings, f"transformer.{module}")
        out.update({f"{LORA_PREFIX}{module}.{suffix}": value for suffix, value in converted.items()})
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"transformer.{module}: needs lora_A and lora_B, found {sorted(parts)}")
        down, up = parts["lora_A"], parts["lora_B"]
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise ValueError(f"transformer.{module}: lora_A rank {rank} does not match lora_B {tuple(up.shape)}")
        alpha = module_alpha(settings, module, rank, None, f"transformer.{module}")
        out[f"{LORA_PREFIX}{module}.lora_A.weight"] = down.detach().contiguous()
        out[f"{LORA_PREFIX}{module}.lora_B.weight"] = up.detach().contiguous()
        out[f"{LORA_PREFIX}{module}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def network_dim_and_alpha(tensors: Mapping[str, Any]) -> tuple[str, str]:
    """(ss_network_dim, ss_network_alpha): the value, or "Dynamic" when it varies."""
    ranks = {int(v.shape[0]) for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    alphas = {float(v.item()) for k, v in tensors.items() if k.endswith(".alpha")}
    return (str(ranks.pop()) if len(ranks) == 1 else "Dynamic", str(alphas.pop()) if len(alphas) == 1 else "Dynamic")


def export_zimage_lora(diffusers_lora: Path, out_path: Path, metadata: Mapping[str, str], alphas: Any = None) -> Path:
    """Read the training's diffusers LoRA (file or folder), convert it and write the ComfyUI file."""
    from tuneline.core.tensorfile import save_tensors

    state_dict, settings = read_diffusers_lora(diffusers_lora)
    alphas = alphas if alphas is not None else settings
    if alphas is None:
        raise ValueError(f"{diffusers_lora} has no adapter metadata (lora_alpha); pass alphas=(rank, alpha)")
    tensors = diffusers_lora_to_comfy(state_dict, alphas)
    if any(key.endswith(LYCORIS_SUFFIXES) for key in tensors):  # the trained rank and alpha (a full LoKr has none)
        settings = lora_alpha_settings(alphas, "transformer") or {}
        rank, alpha = str(settings["r"]), str(float(settings.get("alpha", settings.get("lora_alpha"))))
    else:
        rank, alpha = network_dim_and_alpha(tensors)
    header = check_header({**dict(metadata), "ss_network_dim": rank, "ss_network_alpha": alpha})
    return save_tensors(tensors, Path(out_path), header)


# --- headers ------------------------------------------------------------------------------------

# Z-Image's modelspec names, as kohya's musubi-tuner writes them (utils/sai_model_spec.py: ARCH_Z_IMAGE,
# IMPL_Z_IMAGE; a LoRA adds "/lora"); flow matching has no modelspec.prediction_type there.
ZIMAGE_ARCHITECTURE = "Z-Image"
ZIMAGE_IMPLEMENTATION = "https://github.com/Tongyi-MAI/Z-Image"


def zimage_metadata(
    *,
    kind: str,
    title: str,
    data_digest: str,
    params_digest: str,
    code_version: str,
    mlflow_run_id: str | None = None,
    git_commit: str = "unknown",
    git_dirty: bool | None = None,
    resolution: tuple[int, int] = (1024, 1024),
    trigger_phrase: str | None = None,
    date: _dt.datetime | str | None = None,
    description: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Header of a Z-Image export (`kind`: checkpoint, lora or vae): `modelspec.*` 1.0.1 with the
    architecture `Z-Image` (`Z-Image/lora`, `Z-Image/vae`) and Z-Image's implementation, no prediction
    type (flow matching), the same provenance as the SDXL files, and `extra`."""
    suffix = {"checkpoint": "", "lora": "/lora", "vae": "/vae"}[kind]
    return header_metadata(
        architecture=ZIMAGE_ARCHITECTURE + suffix, implementation=ZIMAGE_IMPLEMENTATION, title=title,
        data_digest=data_digest, params_digest=params_digest, code_version=code_version, mlflow_run_id=mlflow_run_id,
        git_commit=git_commit, git_dirty=git_dirty, prediction_type=None, zero_terminal_snr=None,
        resolution=resolution, trigger_phrase=None if kind == "vae" else trigger_phrase,
        date=None if kind == "vae" else date, extra=extra, description=description)


# --- the exporter -------------------------------------------------------------------------------

COMPONENTS = {"transformer": "transformer (Z-Image DiT)"}


class ZImageExporter:
    """The export stage's questions, answered for Z-Image (the `Exporter` Protocol of tuneline.models.contracts):
    the transformer's LoRA in ComfyUI's keys, the full fine-tune as the transformer alone, the 16-channel
    VAE in the layout of its `ae.safetensors`."""

    components = COMPONENTS
    vae_layout = "the 16-channel Flux/Z-Image VAE in the layout of its `ae.safetensors`: ComfyUI `models/vae`"

    def trained_modes(self, trained: TrainConfig) -> dict[str, str]:
        """A run that trained its Qwen3 text encoder has no export (ValueError)."""
        if trained.text_encoder_1.mode != "frozen" or trained.text_encoder_2.mode != "frozen":
            raise ValueError("export: this Z-Image run trained its text encoder; only the transformer (LoRA or "
                             "full) exports for Z-Image so far")
        return {"transformer": trained.mode}

    def names(self, parts: Sequence[str]) -> str:
        return " and ".join(COMPONENTS[p] for p in parts)

    def checkpoint_description(self, full: Sequence[str], untouched: Sequence[str], dtype: str) -> str:
        return (f"single-file Z-Image diffusion model ({dtype}): the fully trained transformer alone in "
                "ComfyUI's Z-Image layout (models/diffusion_models)")

    def lora_kind(self, lora: LoraConfig) -> str:
        if lora.type != "lora":
            return f"Z-Image {lycoris_title(lora)} (`diffusion_model.` keys, LyCORIS tensor names: ComfyUI)"
        return "Z-Image LoRA (`diffusion_model.` keys: ComfyUI, diffusers' load_lora_weights)"

    def component_line(self, name: str, mode: str, lora: LoraConfig) -> str:
        if mode != "lora":
            return f"- {COMPONENTS[name]}: {mode}"
        return f"- {COMPONENTS[name]}: {lycoris_title(lora)} rank {lora.rank}, alpha {lora.alpha}"

    def header(self, kind: str, facts: HeaderFacts, extra: Mapping[str, str], *, file_name: str, lora: LoraConfig,
               description: str | None = None) -> dict[str, str]:
        return zimage_metadata(kind=kind, title=facts.title, resolution=facts.resolution,
                               trigger_phrase=facts.trigger_phrase, date=facts.date, description=description,
                               extra=extra, **facts.provenance_args())

    def write_checkpoint(self, pipeline_dir: Path, out: Path, dtype: str, metadata: Mapping[str, str]) -> Path:
        return transformer_to_single_file(Path(pipeline_dir) / "transformer", out, dtype, metadata)

    def write_lora(self, lora_file: Path, out: Path, metadata: Mapping[str, str], model: ModelConfig,
                   root: Path) -> Path:
        return export_zimage_lora(lora_file, out, metadata)

    def write_vae(self, state_dict: Mapping[str, Any], config: Mapping[str, Any], out: Path, dtype: str,
                  metadata: Mapping[str, str]) -> Path:
        # The Flux-lineage VAE keeps the ldm layout of SD's (16 latent channels, no quant convs).
        from tuneline.models.export import vae_to_single_file

        return vae_to_single_file(state_dict, config, out, dtype, metadata)

    def card_training(self, prediction_type: str, trained: TrainConfig, resolution: int) -> str:
        return f"- flow matching (velocity noise - x0), resolution {resolution}"

    def card_use(self, files: Sequence[ExportedFile], prediction_type: str, trained: TrainConfig) -> list[str]:
        return ["## Use", "", "ComfyUI: the diffusion model goes into `models/diffusion_models` (Load Diffusion Model; "
                "the Qwen3 text encoder and the VAE are separate files, CLIP type `lumina2`), LoRAs into "
                "`models/loras`" + (", the VAE into `models/vae`." if any(f.kind == "vae" for f in files) else "."),
                "diffusers: `ZImagePipeline.from_pretrained(base)` then `pipe.load_lora_weights(path)`; a full "
                "fine-tune: the `diffusers/pipeline` folder (`ZImagePipeline.from_pretrained`).",
                "Guidance follows ZImagePipeline's convention: 0 turns it off; g > 0 gives pos + g*(pos - neg)."] + (
                    [f"The {lycoris_title(trained.lora)} file has LyCORIS' tensor names: ComfyUI loads it; diffusers' "
                     "load_lora_weights reads LoRA keys only."] if trained.lora.type != "lora" else [])
