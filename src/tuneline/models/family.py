"""Which model family a base model is (from its model_index.json), without importing torch or
loading any weights. Apart from the adapter table (tuneline.models.registry), so that adding an
adapter leaves the item keys of the stages that only ask for the family (latents, render,
export) as they were."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.core.params import ParamsError

if TYPE_CHECKING:
    from tuneline.stages.models.config import ModelConfig


# model_index.json `_class_name` -> family. A saved img2img pipeline has the same components.
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "ZImagePipeline": "zimage",
    "ZImageImg2ImgPipeline": "zimage",
}
FAMILIES = tuple(sorted(set(PIPELINE_FAMILIES.values())))


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
        return "sdxl"
    index = _model_index(model, resolved)
    class_name = index.get("_class_name")
    family = PIPELINE_FAMILIES.get(class_name) if isinstance(class_name, str) else None
    if family is None:
        raise ParamsError(
            f"model.base {model.base!r} is a {class_name!r} pipeline, which no model family handles; known "
            f"families: {', '.join(FAMILIES)} (pipelines {', '.join(sorted(PIPELINE_FAMILIES))}); set "
            "model.family to one of them if this pipeline has that family's components"
        )
    return family


def _model_index(model: ModelConfig, resolved: Path | str) -> dict[str, Any]:
    override = f"set model.family ({' or '.join(FAMILIES)}) to skip detection"
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
