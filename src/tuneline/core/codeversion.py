"""Code versions derived from the code itself: a digest of the modules that produce a stage's
items. A change to any of them changes every item key of that stage, so no stored result made
by older code is ever reused; a change elsewhere (reports, progress, tracking) costs nothing.

Each data stage names its modules in `CODE` (its package's __init__); tests/test_layout.py
fails when a module the stage imports, and that can shape its items, is not covered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # src/tuneline (or site-packages/tuneline)


def code_files(paths: Sequence[str]) -> list[Path]:
    """The .py files named by `paths` (files, or folders: every module inside), relative to the package."""
    files: set[Path] = set()
    for relative in paths:
        path = PACKAGE / relative
        if path.is_dir():
            files.update(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        elif path.is_file():
            files.add(path)
        else:
            raise FileNotFoundError(f"code path {relative!r} does not exist under {PACKAGE}")
    return sorted(files)


@lru_cache(maxsize=None)
def code_version(paths: tuple[str, ...]) -> str:
    """Digest of the named modules' bytes (with their paths, so a move within them counts)."""
    digest = hashlib.sha256()
    for path in code_files(paths):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]
