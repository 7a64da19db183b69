"""The `caption` params section (torch-free)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from tuneline.core.fsutil import ChosenReference
from tuneline.core.params import Section


class CaptionConfig(Section):
    """Stage `caption`: caption every bucketed image with Florence-2, keeping sidecar captions and hand edits."""

    model: ChosenReference = Field(
        "tiny-florence2",
        description="Florence-2 model: a hub id (e.g. florence-community/Florence-2-base), a local folder in the "
        "native transformers layout, or 'tiny-florence2' (a tiny RANDOM-weight model: its captions mean nothing).",
    )
    revision: Optional[str] = Field(
        None, description="Hub revision (branch, tag or commit) of `model`; pin a commit for caches that never go stale."
    )
    task: Literal["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"] = Field(
        "<CAPTION>", description="Florence-2 task prompt: one sentence, a paragraph, or a longer paragraph."
    )
    mode: Literal["fill", "overwrite", "sidecar_only"] = Field(
        "fill",
        description="fill: keep sidecar captions and caption only images without one; overwrite: caption every "
        "image with the model; sidecar_only: never run the model (images without a sidecar get default_caption).",
    )
    batch_size: int = Field(
        8, ge=1, description="Images per generate call; halved automatically when a batch runs out of memory."
    )
    num_beams: int = Field(3, ge=1, description="Beam search width (1 is greedy, fastest).")
    max_new_tokens: int = Field(
        256, ge=1, le=1024, description="Longest caption in tokens; longer ones are cut off."
    )
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Model precision; auto is bf16 (or fp16 on GPUs without bf16) on CUDA and fp32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs; auto is the GPU when there is one, else the CPU."
    )
    default_caption: str = Field(
        "a photo",
        description="Caption of an image whose model caption is empty after cleaning, or that has no sidecar "
        "in sidecar_only mode (such images are counted as 'defaulted').",
    )
