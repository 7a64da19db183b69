"""What a model family is, in one object per family, and which family a base model is.

    family = family_of(params.model, root)        # or FAMILIES["sdxl"], or get_family(name)
    adapter = family.build_adapter(params.model, params.train, root)
    cache = family.load("text_cache")()           # the latents stage's text-embedding cache
    family.render.pipeline                        # render facts: plain data, no import

Each family package (`tuneline.models.sdxl`, `tuneline.models.zimage`) declares its `FAMILY` in
its `__init__`, which imports nothing heavy; the heavy parts (adapter, text cache, exporter,
rules) are named by import path and loaded on first use, so detection and `tuneline check` stay
instant. Stages ask the family and never branch on its name: a new family is a new package and
one line in `_FAMILY_PACKAGES`. The autoencoder is its own kind beside the families
(`tuneline.models.autoencoder`).

Detection reads the base's model_index.json without importing torch or loading any weights.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.core.params import ParamsError
from tuneline.models.base import Family, RenderFacts, load_object

if TYPE_CHECKING:
    from tuneline.models.config import ModelConfig


# The family packages, each with a torch-free `FAMILY`. Order is the order users see.
_FAMILY_PACKAGES = ("tuneline.models.sdxl", "tuneline.models.zimage")


def _registry() -> dict[str, Family]:
    families = [importlib.import_module(package).FAMILY for package in _FAMILY_PACKAGES]
    return {family.name: family for family in families}


FAMILIES: dict[str, Family] = _registry()
PIPELINE_FAMILIES: dict[str, str] = {pipeline: f.name for f in FAMILIES.values() for pipeline in f.pipelines}
FAMILY_NAMES = tuple(FAMILIES)


def get_family(name: str) -> Family:
    """The family called `name`; ParamsError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ParamsError(f"unknown model family {name!r}; families: {', '.join(FAMILY_NAMES)}") from None


def family_of(model: ModelConfig, root: Path | None = None) -> Family:
    """The Family of `model.base` (detect_family)."""
    return get_family(detect_family(model, root))


def detect_family(model: ModelConfig, root: Path | None = None) -> str:
    """The family of `model.base`: `model.family` when set, else from its model_index.json.

    The base may be a tiny model id, a local diffusers folder, a hub id (its model_index.json
    read from the HF cache, else fetched: one small file) or a single file, which is SDXL
    today (the single-file loader is SDXL's). An unknown or unreadable pipeline class is a
    ParamsError that names the known families and the `model.family` override.
    """
    if model.family is not None:
        return model.family
    from tuneline.models.ref import resolve_model

    resolved = resolve_model(model.base, root)
    if isinstance(resolved, Path) and resolved.is_file():
        return next(f.name for f in FAMILIES.values() if f.single_file_base)
    index = _model_index(model, resolved)
    class_name = index.get("_class_name")
    family = PIPELINE_FAMILIES.get(class_name) if isinstance(class_name, str) else None
    if family is None:
        raise ParamsError(
            f"model.base {model.base!r} is a {class_name!r} pipeline, which no model family handles; known "
            f"families: {', '.join(FAMILY_NAMES)} (pipelines {', '.join(sorted(PIPELINE_FAMILIES))}); set "
            "model.family to one of them if this pipeline has that family's components"
        )
    return family


def _model_index(model: ModelConfig, resolved: Path | str) -> dict[str, Any]:
    override = f"set model.family ({' or '.join(FAMILY_NAMES)}) to skip detection"
    if isinstance(resolved, Path):
        file = resolved / "model_index.json"
        if not file.is_file():
            raise ParamsError(f"model.base {model.base!r}: no model_index.json in {resolved}; {override}")
    else:
        file = _hub_model_index(model, override)
    try:
        index = json.loads(file.read_text("utf-8"))
    except (OSError, ValueError) as error:
        raise ParamsError(f"model.base {model.base!r}: cannot read {file} ({error}); {override}") from error
    if not isinstance(index, dict):
        raise ParamsError(f"model.base {model.base!r}: {file} is not a JSON object; {override}")
    return index


def _hub_model_index(model: ModelConfig, override: str) -> Path:
    """model_index.json of hub id `model.base`: from the HF cache, else downloaded unless offline."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(model.base, "model_index.json", revision=model.revision)
    if isinstance(cached, str):
        return Path(cached)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ParamsError(f"model.base {model.base!r}: model_index.json is not in the HF cache and "
                          f"HF_HUB_OFFLINE is set; {override}")
    try:
        return Path(hf_hub_download(model.base, "model_index.json", revision=model.revision))
    except Exception as error:  # no network, no such id, gated: all mean "cannot tell"
        raise ParamsError(f"model.base {model.base!r}: cannot fetch its model_index.json "
                          f"({type(error).__name__}: {error}); {override}") from error
