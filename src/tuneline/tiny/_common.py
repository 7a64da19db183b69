"""Helpers shared by the tiny-model builders: seeding, the warning note."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

# Bump when a builder changes what it writes: cache folders carry it in their name.
TINY_VERSION = 1

NOTE_NAME = "TINY_RANDOM_MODEL.txt"
RANDOM_WARNING = (
    "this is a TINY model with RANDOM weights for tests and demos; its outputs (images, captions) mean nothing"
)


@contextlib.contextmanager
def seeded(seed: int, component: int = 0) -> Iterator[None]:
    """Seed torch's CPU RNG for one component's weight init, leaving the caller's RNG state alone.

    Each component gets its own stream (`seed * 1000 + component`), so seeds never overlap
    between components or between neighbouring `seed` values.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + component)
        yield


def write_note(path: Path, kind: str, seed: int) -> None:
    """Leave a human-readable marker in the model folder so nobody mistakes it for a real model."""
    (Path(path) / NOTE_NAME).write_text(
        f"tuneline tiny-{kind} (builder version {TINY_VERSION}, seed {seed})\n\n"
        f"WARNING: {RANDOM_WARNING}.\n"
        "The layout and configs are the standard ones, so every loader and pipeline runs for real,\n"
        "but the weights were never trained.\n",
        "utf-8",
    )
