"""SDXL prompt conditioning: what the UNet's cross-attention and added-condition inputs get from text.

Shared by the latents stage (`SDXLTextCache`, the text-embedding cache) and the trainer
(encoders live when they are trained, or when caption dropout/shuffle makes a cache invalid),
so both produce the same tensors for the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tuneline.models.contracts import EncodedText

if TYPE_CHECKING:
    from tuneline.models.config import ModelConfig
    from tuneline.models.loading import ComponentSource

# CLIP's context length; SDXL pads and truncates every prompt to it.
MAX_TOKENS = 77
# The prompt embeddings are each encoder's penultimate hidden state (SDXL without clip skip).
PROMPT_HIDDEN_STATE = -2


def conditioning_layers(encoder: Any) -> list[int]:
    """Indices of the encoder layers whose output reaches the UNet through `encode_prompts`.

    hidden_states[-2] is the output of layer N-2, so the last layer only counts for an
    encoder whose pooled output is used: the one with a text projection (SDXL's second,
    whose text_embeds are final_layer_norm(last layer)[EOS] @ projection). The first
    encoder's last layer (and final layer norm) never affect the result.
    """
    count = encoder.config.num_hidden_layers
    used = count + 1 + PROMPT_HIDDEN_STATE  # hidden_states[0] is the embeddings
    return list(range(count if hasattr(encoder, "text_projection") else used))


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
        hidden_states.append(output.hidden_states[PROMPT_HIDDEN_STATE])
        # Only CLIPTextModelWithProjection (SDXL's second encoder) has text_embeds.
        pooled = getattr(output, "text_embeds", pooled)
    if pooled is None:
        raise ValueError("no text encoder with a projection (CLIPTextModelWithProjection) among text_encoders")
    return torch.cat(hidden_states, dim=-1), pooled


TEXT_FORMAT = "tuneline-sdxl-text-embeddings"


class SDXLTextCache:
    """SDXL's text cache (tuneline.models.contracts.TextCache): per caption `prompt_embeds`
    [77, hidden1 + hidden2] and `pooled` [projection], as StableDiffusionXLPipeline.encode_prompt."""

    format: ClassVar[str] = TEXT_FORMAT
    truncation: ClassVar[str] = ""  # CLIP's 77 tokens cut silently, as the pipeline does

    def sources(self, model: ModelConfig, root: Path | None) -> dict[str, ComponentSource]:
        from tuneline.models.loading import text_encoder_sources

        return text_encoder_sources(model, root)

    def key_fields(self, caption: str, identities: dict[str, str], dtype: str, quantize: str) -> dict[str, Any]:
        from tuneline.models.quantize import cache_key_fields

        return {"caption": caption, "encoders": identities, "dtype": dtype,  # both tokenizers and encoders
                **cache_key_fields(quantize)}

    def load(self, model: ModelConfig, root: Path | None, dtype: str, device: str) -> Any:
        from tuneline.models.loading import load_text_encoders

        return load_text_encoders(model, root, dtype, device)

    def order(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return items  # every prompt is padded to 77 tokens: batching order changes no cost

    def encode(self, models: Any, captions: list[str], device: str) -> list[EncodedText]:
        tokenizers, encoders = models
        embeds, pooled = encode_prompts(tokenizers, encoders, captions, device)
        return [EncodedText({"prompt_embeds": embeds[b].cpu(), "pooled": pooled[b].cpu()})
                for b in range(len(captions))]

    def summary(self) -> dict[str, Any]:
        return {}
