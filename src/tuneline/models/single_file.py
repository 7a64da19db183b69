"""A single-file SDXL base (original / SGM layout, as downloaded from civitai) as a diffusers folder.

Every loader of the project reads diffusers folders (`from_pretrained(..., subfolder=...)`),
so a single-file `model.base` is converted ONCE, with diffusers' own single-file loader,
into `<root>/.tuneline/models/single-file-<key>/` and that folder is used everywhere.
The key is a digest of the file's content (through the `FileDigests` stat cache, so an
unchanged file is not re-read) and of `model.config`, whose configs and tokenizers
the conversion takes: a new file or another config converts again, a renamed file does not.

The build goes into a temp folder beside the final one and is renamed into place under a
lock, so a killed or concurrent conversion never leaves a folder that is trusted.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from tuneline.core.params import ParamsError
from tuneline.models.config import ModelConfig
from tuneline.core.fsutil import build_folder_once, digest_json
from tuneline.core.store import FileDigests

log = logging.getLogger(__name__)

MARKER = "tuneline-single-file.json"  # written last: a folder with it is a finished conversion
# The files of a `model.config` folder the conversion reads: configs and tokenizers, not weights.
_CONFIG_SUFFIXES = {".json", ".txt", ".model"}


def _state_dir(root: Path | None) -> Path:
    return Path(root) / ".tuneline" if root is not None else Path(tempfile.gettempdir()) / "tuneline"


def _digests(root: Path | None) -> FileDigests:
    # The same database as `modelref.model_identity`: the file is hashed once for both.
    return FileDigests(_state_dir(root) / "model-digests.sqlite")


def config_identity(model: ModelConfig, root: Path | None) -> str | None:
    """What of `model.config` decides a converted base: its config and tokenizer files; a hub id as named."""
    if not model.config:
        return None
    from tuneline.models.ref import resolve_model

    location = resolve_model(model.config, root)
    if isinstance(location, str):
        return digest_json({"hub": model.config})
    files = sorted(p for p in location.rglob("*") if p.is_file() and p.suffix in _CONFIG_SUFFIXES)
    digests = _digests(root)
    try:
        entries = {str(p.relative_to(location)): digests.digest(p) for p in files}
        digests.commit()
    finally:
        digests.close()
    return digest_json({"config_files": entries})


def converted_dir(path: Path, model: ModelConfig, root: Path | None) -> Path:
    """Where the diffusers folder of single file `path` converted with `model.config` lives."""
    digests = _digests(root)
    try:
        content = digests.digest(path)
        digests.commit()
    finally:
        digests.close()
    config = config_identity(model, root)
    key = content if config is None else digest_json({"file": content, "config": config})
    return _state_dir(root) / "models" / f"single-file-{key[:32]}"


def is_converted(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def ensure_converted(path: Path, model: ModelConfig, root: Path | None) -> Path:
    """The diffusers pipeline folder of single-file checkpoint `path`, converting it on first use."""
    # _convert is looked up at build time, so tests can count conversions.
    return build_folder_once(converted_dir(path, model, root), lambda staging: _convert(path, model, root, staging),
                             is_converted)


def _from_single_file(path: Path, model: ModelConfig, root: Path | None):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from tuneline.models.ref import resolve_model

    # fp32, like the hub's diffusers folders: stages cast to their own dtype when they load.
    kwargs = {"torch_dtype": torch.float32}
    if model.config:
        config = resolve_model(model.config, root)
        kwargs["config"] = str(config)
        kwargs["local_files_only"] = isinstance(config, Path)
    try:
        return StableDiffusionXLPipeline.from_single_file(str(path), **kwargs)
    except Exception as error:  # diffusers raises OSError, ValueError, hub errors... for a missing config
        if model.config:
            raise ParamsError(
                f"model.base is a single file ({path}) that diffusers could not load with model.config "
                f"{model.config!r}: {type(error).__name__}: {error}"
            ) from error
        raise ParamsError(
            f"model.base is a single file ({path}) and diffusers could not fetch the configs that describe it "
            f"({type(error).__name__}: {error}); set model.config to a diffusers folder or hub id with the same "
            "architecture (e.g. stabilityai/stable-diffusion-xl-base-1.0, or a local copy of it when offline)"
        ) from error


def _convert(path: Path, model: ModelConfig, root: Path | None, staging: Path) -> None:
    """Write the diffusers folder of `path` into `staging`, the marker last."""
    log.info("converting single-file base %s into a diffusers folder (once)", path)
    pipeline = _from_single_file(path, model, root)
    pipeline.save_pretrained(staging)
    del pipeline
    (staging / MARKER).write_text(json.dumps({"source": str(path), "config": model.config}, indent=2) + "\n",
                                  "utf-8")
