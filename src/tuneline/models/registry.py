"""The trainer adapters: a diffusion family's (tuneline.models.family) or an autoencoder kind's
(tuneline.models.autoencoder: `autoencoder_kl`, `autoencoder_vq`).

    adapter = build_adapter("sdxl", params.model, params.train, root)

A new family is a new package with its `FAMILY`; nothing here changes.
"""

from __future__ import annotations

from typing import Any

from tuneline.models.base import load_object

AUTOENCODER_KL = "autoencoder_kl"
AUTOENCODER_VQ = "autoencoder_vq"


def adapter_class(kind: str) -> type:
    """The adapter class of a family name or of an autoencoder kind (`autoencoder_kl`, `autoencoder_vq`);
    KeyError naming the known kinds otherwise."""
    from tuneline.models.autoencoder import KINDS
    from tuneline.models.family import FAMILIES

    autoencoders = {k.registry_name: k for k in KINDS.values()}
    if kind in autoencoders:
        return load_object(autoencoders[kind].adapter)
    if kind not in FAMILIES:
        raise KeyError(f"no trainer adapter for {kind!r}; kinds: {', '.join(sorted([*autoencoders, *FAMILIES]))}")
    return load_object(FAMILIES[kind].adapter)


def build_adapter(kind: str, *args: Any, **kwargs: Any) -> Any:
    """An adapter of `kind`, built with its own constructor arguments."""
    return adapter_class(kind)(*args, **kwargs)
