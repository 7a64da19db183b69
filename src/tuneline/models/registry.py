"""The trainer adapters: a diffusion family's (tuneline.models.family) or the autoencoder kind's.

    adapter = build_adapter("sdxl", params.model, params.train, root)

A new family is a new package with its `FAMILY`; nothing here changes.
"""

from __future__ import annotations

from typing import Any

from tuneline.models.base import load_object

AUTOENCODER_KL = "autoencoder_kl"


def adapter_class(kind: str) -> type:
    """The adapter class of a family name or of `autoencoder_kl`; ParamsError naming the known ones otherwise."""
    if kind == AUTOENCODER_KL:
        from tuneline.models.autoencoder import ADAPTER

        return load_object(ADAPTER)
    from tuneline.models.family import get_family

    return load_object(get_family(kind).adapter)


def build_adapter(kind: str, *args: Any, **kwargs: Any) -> Any:
    """An adapter of `kind`, built with its own constructor arguments."""
    return adapter_class(kind)(*args, **kwargs)
