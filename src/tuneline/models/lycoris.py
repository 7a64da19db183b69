"""LyCORIS adapters (train.lora.type loha | lokr) through PEFT: what training injects, what the trained
file records, how render puts it back on a pipeline, and the LyCORIS key layout the exporters write.

Training builds PEFT's LoHaConfig / LoKrConfig (peft 0.21) from train.lora (`adapter_settings`,
`peft_config`); a LoRA keeps exactly the LoraConfig arguments it always had, so its files and run keys
do not change. The trained file is written by the family's `save_lora_weights` like a LoRA's
(`<component>.<module>.hada_w1_a`, ...), with the settings in its `lora_adapter_metadata` header and
`peft_type` naming the adapter. diffusers' load_lora_weights builds a LoraConfig for every file, so
render loads a LoHa / LoKr through PEFT itself (`load_trained_lora`).

PEFT and LyCORIS share the tensors: PEFT's LoHa/LoKr layers were written after LyCORIS' modules (their
docstrings cite them), with the same names, shapes and factorization (`factor`: PEFT's
decompose_factor). The one difference is the scale of a LoKr whose two factors are both full matrices
(rank >= half the larger side of each): PEFT scales by alpha / rank, LyCORIS (LokrModule: alpha =
lora_dim when use_w1 and use_w2) and ComfyUI (weight_adapter/lokr.py: alpha / dim only when a factor is
decomposed, else 1) by 1. `lycoris_module_tensors` folds alpha / rank into lokr_w2 there, so every
reader applies PEFT's delta. No Tucker factors (hada_t1/t2, lokr_t2): PEFT's use_effective_conv2d is
left off, as in LyCORIS' default (use_tucker False).

Importing this module is instant: torch, peft and safetensors load inside the functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneline.train.config import LoraConfig, TrainConfig

PEFT_TYPES = {"loha": "LOHA", "lokr": "LOKR"}  # train.lora.type -> PEFT's peft_type (a LoRA records none)
TYPE_KEY = "peft_type"  # where the adapter metadata of a LoHa / LoKr names it
LYCORIS_PARTS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
# Suffixes of a LyCORIS file's keys that tuneline writes (beside `.alpha`).
LYCORIS_SUFFIXES = tuple(f".{part}" for parts in LYCORIS_PARTS.values() for part in parts)
_PART = re.compile(r"(.+)\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t[12])")
TITLES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}
_NESTED = re.compile(r"\.base_layer(?=\.(?:hada_|lokr_))")


def title(lora: LoraConfig) -> str:
    """How files and cards name the adapter: LoRA, DoRA, LoHa or LoKr."""
    return "DoRA" if lora.type == "lora" and lora.use_dora else TITLES[lora.type]


# --- what runs together ------------------------------------------------------------------------------

def problems(quantize: str, train: TrainConfig) -> list[str]:
    """One line per setting that cannot run with train.lora.type loha / lokr (for tuneline check and the
    adapters). The LoRA-only settings (use_dora, dropout) are LoraConfig's own validation."""
    if train.lora.type == "lora" or "lora" not in (train.mode, train.text_encoder_1.mode, train.text_encoder_2.mode):
        return []
    found = []
    if quantize == "nf4":
        found.append(f"model.quantize: 'nf4' with train.lora.type {train.lora.type!r}: PEFT's LoHa / LoKr layers "
                     "(peft 0.21) have no bitsandbytes 4-bit version (they reshape their update to the packed 4-bit "
                     "weight and fail); allowed with loha / lokr: 'none', 'int8', 'fp8'; or train.lora.type 'lora'")
    return found


def refuse(quantize: str, train: TrainConfig) -> None:
    """ParamsError naming every setting `problems` finds (the adapters' check, also made by tuneline check)."""
    from tuneline.core.params import ParamsError

    found = problems(quantize, train)
    if found:
        raise ParamsError("settings that cannot run together:\n" + "\n".join(f"  - {p}" for p in found))


# --- training ---------------------------------------------------------------------------------------

def adapter_settings(lora: LoraConfig, target_modules: Any) -> dict[str, Any]:
    """The PEFT config arguments of train.lora for `target_modules` (also the adapter metadata saved with the
    weights): LoraConfig's for type lora (as before LoHa/LoKr existed), else LoHaConfig's / LoKrConfig's
    with `peft_type` naming the adapter."""
    if lora.type == "lora":
        return {"r": lora.rank, "lora_alpha": lora.alpha, "use_dora": lora.use_dora, "target_modules": target_modules}
    settings: dict[str, Any] = {TYPE_KEY: PEFT_TYPES[lora.type], "r": lora.rank, "alpha": lora.alpha,
                                "target_modules": target_modules}
    if lora.type == "lokr":
        settings |= {"decompose_factor": lora.factor, "decompose_both": lora.decompose_both}
    return settings


def trained_state_dict(module: Any) -> dict[str, Any]:
    """The trained adapter's tensors of `module` (PEFT's state dict of adapter "default", adapter name left out).
    A LoHa / LoKr layer wrapped by model.training_adapter's LoRA layer (PEFT nests an adapter of another type
    around the layer) is saved under the module's own name, without the wrapper's `.base_layer`: the name
    every reader, and render's fresh model, has."""
    from peft.utils import get_peft_model_state_dict

    return {_NESTED.sub("", key): value for key, value in get_peft_model_state_dict(module).items()}


def adapter_type(settings: Mapping[str, Any] | None) -> str:
    """lora, loha or lokr: the adapter a component's saved settings describe (no settings: a LoRA)."""
    kind = (settings or {}).get(TYPE_KEY)
    if kind is None or kind == "LORA":  # a LoraConfig's to_dict() names itself
        return "lora"
    for name, peft_type in PEFT_TYPES.items():
        if kind == peft_type:
            return name
    raise ValueError(f"adapter settings name peft_type {kind!r}; tuneline reads "
                     f"{', '.join(['LORA', *PEFT_TYPES.values()])}")


def peft_config(settings: Mapping[str, Any], dropout: float = 0.0) -> Any:
    """The PEFT config of `settings` (adapter_settings' or a trained file's metadata). A LoRA starts from
    Gaussian down weights and zero up weights with `dropout` on its input; a LoHa / LoKr from PEFT's own
    initialisation (one factor zero: the adapted layer starts as the base layer)."""
    from peft import LoHaConfig, LoKrConfig
    from peft import LoraConfig as PeftLoraConfig

    kind = adapter_type(settings)
    arguments = {key: value for key, value in settings.items() if key != TYPE_KEY}
    if kind == "lora":
        return PeftLoraConfig(**arguments, lora_dropout=dropout, init_lora_weights="gaussian")
    return {"loha": LoHaConfig, "lokr": LoKrConfig}[kind](**arguments)


# --- render: the trained file back on a pipeline -------------------------------------------------------

def _file_settings(path: Path) -> dict[str, dict[str, Any]]:
    """component -> its adapter settings, from the `lora_adapter_metadata` header save_lora_weights writes
    (flat: "unet.r", "unet.peft_type", ...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    settings: dict[str, dict[str, Any]] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, field = key.partition(".")
        settings.setdefault(component, {})[field] = value
    return settings


def load_trained_lora(pipeline: Any, path: Path, adapter_name: str) -> str:
    """Put the trained adapter file at `path` on `pipeline` as `adapter_name` (then the pipeline's
    set_adapters scales it, as a LoRA's): a LoRA through diffusers' load_lora_weights, a LoHa / LoKr by
    adding PEFT's adapter to each component the file holds and loading its tensors (every one must land).
    Returns the adapter type."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    settings = _file_settings(path)
    kinds = {adapter_type(component) for component in settings.values()} or {"lora"}
    if kinds == {"lora"}:
        pipeline.load_lora_weights(path.parent, weight_name=path.name, adapter_name=adapter_name)
        return "lora"
    if len(kinds) > 1:
        raise ValueError(f"{path}: components with different adapter types {sorted(kinds)}")
    tensors: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(path)).items():
        component, _, rest = key.partition(".")
        tensors.setdefault(component, {})[rest] = tensor
    if set(tensors) != set(settings):
        raise ValueError(f"{path}: weights for {sorted(tensors)} but adapter settings for {sorted(settings)}")
    for component, state in tensors.items():
        module = getattr(pipeline, component)
        module.add_adapter(peft_config(settings[component]), adapter_name=adapter_name)
        result = set_peft_model_state_dict(module, state, adapter_name=adapter_name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        loaded = [name for name, _ in module.named_parameters() if f".{adapter_name}" in name]
        if unexpected or len(loaded) != len(state):
            raise ValueError(f"{path}: {component}: {len(state)} tensors in the file, {len(loaded)} adapter "
                             f"parameters in the model (unexpected: {unexpected[:3]})")
    return kinds.pop()


# --- export: the LyCORIS key layout ---------------------------------------------------------------------

def lycoris_part(rest: str) -> tuple[str, str] | None:
    """(module, part) of a PEFT LoHa / LoKr key (`down_blocks.0.attn1.to_q.hada_w1_a`); None for any other key."""
    match = _PART.fullmatch(rest)
    return (match[1], match[2]) if match is not None else None


def _alpha_and_rank(settings: Mapping[str, Any], key: str) -> tuple[float, int | None]:
    if settings.get("rank_pattern") or settings.get("alpha_pattern"):
        raise ValueError(f"{key}: per-module rank_pattern / alpha_pattern are not exported for LoHa / LoKr")
    alpha = settings.get("alpha", settings.get("lora_alpha"))
    if alpha is None:
        raise ValueError(f"no alpha for {key}: pass alphas explicitly (the file has no adapter metadata)")
    rank = settings.get("r")
    return float(alpha), (int(rank) if rank is not None else None)


def lycoris_module_tensors(parts: Mapping[str, Any], settings: Mapping[str, Any], key: str) -> dict[str, Any]:
    """One adapted module's PEFT LoHa / LoKr tensors (part -> tensor) in LyCORIS' layout: part -> tensor
    and `alpha`, such that LyCORIS' modules and ComfyUI's weight adapters rebuild PEFT's delta
    (scale alpha / rank; a LoKr of two full factors has alpha / rank folded into lokr_w2, see the module
    docstring). `settings`: the component's adapter settings (alpha, r)."""
    import torch

    names = set(parts)
    if names & {"hada_t1", "hada_t2", "lokr_t1", "lokr_t2"}:
        raise ValueError(f"{key}: Tucker factors ({sorted(names)}) are not exported (train without "
                         "use_effective_conv2d)")
    alpha, rank = _alpha_and_rank(settings, key)
    out = {part: tensor.detach().contiguous() for part, tensor in parts.items()}
    if names <= set(LYCORIS_PARTS["loha"]):
        if names != set(LYCORIS_PARTS["loha"]):
            raise ValueError(f"{key}: a LoHa module needs {', '.join(LYCORIS_PARTS['loha'])}, found {sorted(names)}")
        ranks = {parts["hada_w1_b"].shape[0], parts["hada_w2_b"].shape[0], parts["hada_w1_a"].shape[1],
                 parts["hada_w2_a"].shape[1]}
        if len(ranks) != 1 or (rank is not None and ranks != {rank}):
            raise ValueError(f"{key}: LoHa ranks {sorted(ranks)} in the weights, settings say rank {rank}")
    elif names <= set(LYCORIS_PARTS["lokr"]):
        w1 = {"lokr_w1"} if "lokr_w1" in names else {"lokr_w1_a", "lokr_w1_b"}
        w2 = {"lokr_w2"} if "lokr_w2" in names else {"lokr_w2_a", "lokr_w2_b"}
        if names != w1 | w2:
            raise ValueError(f"{key}: a LoKr module needs lokr_w1 or lokr_w1_a/_b and lokr_w2 or lokr_w2_a/_b, "
                             f"found {sorted(names)}")
        ranks = {parts[name].shape[0] for name in ("lokr_w1_b", "lokr_w2_b") if name in parts}
        if len(ranks) > 1 or (rank is not None and ranks and ranks != {rank}):
            raise ValueError(f"{key}: LoKr ranks {sorted(ranks)} in the weights, settings say rank {rank}")
        if not ranks:  # both factors full: the readers scale by 1, PEFT by alpha / rank
            if rank is None:
                raise ValueError(f"{key}: a LoKr of two full factors needs its rank (r) to scale it")
            out["lokr_w2"] = (parts["lokr_w2"].detach().float() * (alpha / rank)).to(parts["lokr_w2"].dtype)
            alpha = float(rank)
    else:
        raise ValueError(f"{key}: mixes LoHa and LoKr tensors ({sorted(names)})")
    out["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out
