"""The text half of the latents stage: each distinct caption encoded once by the family's text
cache (tuneline.models.contracts.TextCache), one stored file per caption.

The file holds the cache's tensors and, as metadata, its `format`, the code version, the caption,
the dtype, the encoders' identities and the cache's own fields. The manifest record names it under
`text_embeddings` (its key `text_key`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneline.core.store import ItemStore
from tuneline.models.contracts import TextCache
from tuneline.stages.latents.files import Writer
from tuneline.stages.latents.keys import CODE_VERSION, SUFFIX

# Text encoders are cheap next to the VAE: a fixed batch keeps their memory small and steady.
TEXT_BATCH = 32


def encode_texts(model: Any, root: Path, missing: dict[str, str], text_store: ItemStore, device: str,
                 dtype: str, identities: dict[str, str], cache: TextCache) -> list[str]:
    """Encode each missing caption once ({key: caption}) into the text store with the family's
    `cache` (`model`: the params' model section); return the captions that were cut at the
    encoder's maximum length."""
    import torch

    from tuneline.models.loading import release

    models = cache.load(model, root, dtype, device)
    writer = Writer()
    truncated: list[str] = []
    try:
        items = cache.order(sorted(missing.items()))
        for start in range(0, len(items), TEXT_BATCH):
            chunk = items[start:start + TEXT_BATCH]
            with torch.inference_mode():
                encoded = cache.encode(models, [caption for _, caption in chunk], device)
            for (key, caption), text in zip(chunk, encoded, strict=True):
                if text.truncated:
                    truncated.append(caption)
                writer.write(text_store.path(key, SUFFIX), text.tensors,
                             {"format": cache.format, "code_version": CODE_VERSION, "caption": caption,
                              "dtype": dtype, "encoders": identities, **text.metadata})
    finally:
        writer.close()
        del models
        release(device)
    return truncated
