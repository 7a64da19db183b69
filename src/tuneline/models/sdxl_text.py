"""SDXL prompt conditioning: what the UNet's cross-attention and added-condition inputs get from text.

Shared by the latents stage (text-embedding cache) and the trainer (encoders live when
they are trained, or when caption dropout/shuffle makes a cache invalid), so both
produce the same tensors for the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# CLIP's context length; SDXL pads and truncates every prompt to it.
MAX_TOKENS = 77


def encode_prompts(tokenizers: Sequence[Any], text_encoders: Sequence[Any], prompts: Sequence[str],
                   device: Any) -> tuple[Any, Any]:
    """(prompt_embeds [B, 77, hidden1 + hidden2], pooled [B, projection_dim]) for `prompts`.

    As diffusers' StableDiffusionXLPipeline.encode_prompt without clip skip: each encoder's
    penultimate hidden state, concatenated along the feature dimension, and the second
    encoder's projected pooled output. No torch.no_grad here: the trainer backpropagates
    through it when it trains the text encoders.
    """
    import torch

    hidden_states = []
    pooled = None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
        # Only CLIPTextModelWithProjection (SDXL's second encoder) has text_embeds.
        pooled = getattr(output, "text_embeds", pooled)
    if pooled is None:
        raise ValueError("no text encoder with a projection (CLIPTextModelWithProjection) among text_encoders")
    return torch.cat(hidden_states, dim=-1), pooled
