"""What names a stored item of the latents stage: its store, its file, its format and its key.

A latent's key is the bucket key of the pixels + VAE identity + dtype + flip + the code version
(a digest of the modules in CODE): the caption is not in it, so editing a caption costs no VAE
work. A text embedding's key is the caption + what the family's text cache says decides it
(its encoders' identities, dtype, ...) + the code version.
"""

from __future__ import annotations

from typing import Any

from tuneline.core.codeversion import code_version
from tuneline.core.fsutil import digest_json
from tuneline.stages.latents import CODE

STAGE = "latents"
TEXT_STAGE = "text_embeddings"  # its own store folder: it can be cleared without losing latents
CODE_VERSION = code_version(CODE)  # changes with the code that makes the items
SUFFIX = ".safetensors"
FORMAT = "tuneline-latents"


def latent_key(image_key: str, vae_identity: str, dtype: str, flip: bool) -> str:
    return digest_json({
        "stage": STAGE,
        "code": CODE_VERSION,
        "pixels": image_key,  # the bucket key: everything that decided the image's pixels
        "vae": vae_identity,
        "dtype": dtype,
        "flip": flip,
    })


def text_key(key_fields: dict[str, Any]) -> str:
    """The key of one caption's text embedding: the text cache's `key_fields` and the code version."""
    return digest_json({"stage": TEXT_STAGE, "code": CODE_VERSION, **key_fields})


def caption_of(record: dict[str, Any]) -> str:
    # No caption trains the image unconditionally: the family's empty prompt.
    return record.get("caption") or ""
