"""The trainer adapters: a diffusion family's (tuneline.models.family) or the autoencoder kind's.

    adapter = build_adapter("sdxl", params.model, params.train, root)

A new family is a new package with its `FAMILY`; nothing here changes.
"""

from __future__ import annotations

from typing import Any

from tuneline.models.base import load_object

AUTOENCODER_KL = "autoencoder_kl"


def adapter_class(kind: str) -> type:
    """The adapter class of a family name or of `autoencoder_kl`; KeyError naming the known kinds otherwise."""
    from tuneline.models.family import FAMILIES

    if kind == AUTOENCODER_KL:
        from tuneline.models.autoencoder import ADAPTER

        return load_object(ADAPTER)
    if kind not in FAMILIES:
        raise KeyError(f"no trainer adapter for {kind!r}; kinds: {', '.join(sorted([AUTOENCODER_KL, *FAMILIES]))}")
    return load_object(FAMILIES[kind].adapter)


def build_adapter(kind: str, *args: Any, **kwargs: Any) -> Any:
    """An adapter of `kind`, built with its own constructor arguments."""
    return adapter_class(kind)(*args, **kwargs)
