"""The trainer adapters: a diffusion family's (tuneline.models.family) or the autoencoder kind's.

    adapter = build_adapter("sdxl", params.model, params.train, root)

A new family is a new package with its `FAMILY`; nothing here changes.
"""

from __future__ import annotations

from typing import Any

from tuneline.models.base import load_object

AUTOENCODER_KL = "autoencoder_kl"


def adapter_class(kind: str) -> type:
    """The adapter class of a family name or of `autoencoder_kl`; KeyError naming the known ones otherwise."""
    from tuneline.models.autoencoder import ADAPTER
    from tuneline.models.family import FAMILIES

    adapters = {AUTOENCODER_KL: ADAPTER, **{name: family.adapter for name, family in FAMILIES.items()}}
    try:
        return load_object(adapters[kind])
    except KeyError:
        raise KeyError(f"unknown model family {kind!r}; families: {', '.join(sorted(adapters))}") from None


def build_adapter(kind: str, *args: Any, **kwargs: Any) -> Any:
    """An adapter of `kind`, built with its own constructor arguments."""
    return adapter_class(kind)(*args, **kwargs)
