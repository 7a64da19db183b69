"""The `latents` params section (torch-free)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from tuneline.core.params import Section


class LatentsConfig(Section):
    """Stage `latents`: encode every image through the VAE once and cache the latent distribution."""

    batch_size: int = Field(
        4, ge=1, description="Images per VAE call (all of one bucket, so one size); lower it if the VAE runs out of memory."
    )
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="VAE and text-encoder precision: auto is bf16 on CUDA (fp16 where bf16 is unsupported) and fp32 "
        "on CPU. A half-precision batch that overflows to NaN/Inf is re-encoded in fp32 with a warning.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the VAE runs: auto picks CUDA when available.")
    flip: bool = Field(
        False,
        description="Also cache the latent of the horizontally flipped image, so training can flip without the VAE.",
    )
    text_embeddings: bool = Field(
        True,
        description="Also cache each caption's text embeddings (what the model family's frozen text encoders make "
        "of it, as its pipeline encodes a prompt) when that is valid (off automatically with caption dropout or "
        "shuffle, or when the text encoders are trained), and those of the render prompts (data/prompt_embeds: "
        "live samples and the render stage then load no text encoder; off only when the text encoders are "
        "trained). false: neither.",
    )
    workers: Optional[int] = Field(
        None,
        ge=0,
        description="Threads decoding images while the VAE encodes; 0 decodes between VAE calls. null: "
        "min(4, cores) on CUDA, 0 on the CPU (where the VAE already keeps every core busy).",
    )
