"""The model adapters, keyed by family: the one place a family name becomes an adapter.

    adapter = build_adapter("sdxl", params.model, params.train, root)

A second family is a new adapter class registered here, never a copy of the trainer. The
table holds import paths, so looking a family up imports only that family's module.

Which family a base model is: `tuneline.models.family.detect_family`.
"""

from __future__ import annotations

import importlib
from typing import Any

ADAPTERS: dict[str, str] = {
    "sdxl": "tuneline.models.sdxl:SDXLAdapter",
    "zimage": "tuneline.models.zimage:ZImageAdapter",
    "autoencoder_kl": "tuneline.models.autoencoder:AutoencoderAdapter",
}


def adapter_class(family: str) -> type:
    """The adapter class of `family`; KeyError naming the known families otherwise."""
    try:
        target = ADAPTERS[family]
    except KeyError:
        raise KeyError(f"unknown model family {family!r}; families: {', '.join(sorted(ADAPTERS))}") from None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def build_adapter(family: str, *args: Any, **kwargs: Any) -> Any:
    """An adapter of `family`, built with the family's own constructor arguments."""
    return adapter_class(family)(*args, **kwargs)
