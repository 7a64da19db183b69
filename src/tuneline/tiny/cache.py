"""Build-once cache of the tiny models, and the `tiny-*` model ids the project accepts."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from tuneline.core.fsutil import build_folder_once
from tuneline.tiny._common import NOTE_NAME, RANDOM_WARNING, TINY_VERSION
from tuneline.tiny.florence2 import build_tiny_florence2
from tuneline.tiny.sdxl import build_tiny_sdxl
from tuneline.tiny.zimage import build_tiny_zimage

log = logging.getLogger(__name__)

TinyKind = Literal["sdxl", "florence2", "zimage"]

# Model ids (as a user writes them in params/CLI) -> builder kind.
TINY_MODEL_IDS: dict[str, TinyKind] = {
    "tiny-sdxl": "sdxl",
    "tiny-florence2": "florence2",
    "tiny-zimage": "zimage",
}

# Looked up at call time, so tests can count or replace builds.
_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sdxl": build_tiny_sdxl,
    "florence2": build_tiny_florence2,
    "zimage": build_tiny_zimage,
}
_announced: set[Path] = set()


def default_cache_dir() -> Path:
    """`$TUNELINE_HOME/tiny`, else `~/.cache/tuneline/tiny`."""
    home = os.environ.get("TUNELINE_HOME")
    return Path(home) / "tiny" if home else Path.home() / ".cache" / "tuneline" / "tiny"


def tiny_model_dir(kind: TinyKind, cache_dir: Path | None = None) -> Path:
    """Where the built `kind` lives; the builder version is in the name, so a new builder rebuilds."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {sorted(_BUILDERS)}")
    return Path(cache_dir or default_cache_dir()) / f"tiny-{kind}-v{TINY_VERSION}"


def _is_complete(path: Path) -> bool:
    # Builders write the note last, and the folder only gets its final name by an atomic
    # rename, so a folder with the note is a finished build.
    return (path / NOTE_NAME).is_file()


def ensure_tiny_model(kind: TinyKind, cache_dir: Path | None = None) -> Path:
    """Return the folder of the tiny RANDOM `kind` model, building it on first use.

    The build goes into a temp folder beside the final one and is renamed into place
    when complete, so a killed or concurrent build never leaves a folder that is trusted.
    """
    # _BUILDERS is looked up at build time, so tests can count or replace builds.
    final = build_folder_once(tiny_model_dir(kind, cache_dir), lambda staging: _BUILDERS[kind](staging),
                              _is_complete)
    if final not in _announced:
        _announced.add(final)
        # To the stage log only: each stage that uses a tiny model says so once, in its summary.
        log.info("using tiny-%s at %s: %s", kind, final, RANDOM_WARNING)
    return final


def resolve_tiny(name: str, cache_dir: Path | None = None) -> Path | None:
    """The built folder for a tiny model id (`tiny-sdxl`, `tiny-florence2`, `tiny-zimage`); None for any other name."""
    kind = TINY_MODEL_IDS.get(name)
    return None if kind is None else ensure_tiny_model(kind, cache_dir)
