"""Z-Image's prompt encoding: one Qwen3 decoder LM, its second-to-last hidden state, one
variable-length embedding per prompt (what `ZImagePipeline._encode_prompt` computes).

The prompt goes through the tokenizer's chat template as a user message with the generation
prompt (as the pipeline does), is cut at `max_sequence_length` tokens (template included) and
encoded with its attention mask; the padding rows are dropped. Padding to the batch's longest
prompt instead of the pipeline's fixed `max_length` gives the same rows: the text encoder is
causal and masked, so a real token never sees a pad token (tests/test_latents_zimage.py checks
this against the pipeline's own encode).

`ZImageTextCache` is the latents stage's text-embedding cache; the trainer encodes live through
the same `encode_prompts`, with the encoder from the one loader both use
(tuneline.models.loading.load_zimage_text_encoder).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tuneline.models.contracts import EncodedText

if TYPE_CHECKING:
    from tuneline.models.config import ModelConfig
    from tuneline.models.loading import ComponentSource

# ZImagePipeline's default max_sequence_length.
MAX_SEQUENCE_LENGTH = 512
TEXT_FORMAT = "tuneline-zimage-text-embeddings"


def chat_prompts(tokenizer: Any, prompts: list[str]) -> list[str]:
    """Each prompt as the pipeline hands it to the tokenizer (a new list: the pipeline's own
    `_encode_prompt` rewrites its caller's list in place)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=True) for prompt in prompts]


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: list[str],
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH, device: Any = None) -> list[Any]:
    """One [tokens, hidden] tensor per prompt: hidden_states[-2] of the real (unpadded) tokens."""
    device = device if device is not None else next(text_encoder.parameters()).device
    inputs = tokenizer(chat_prompts(tokenizer, prompts), padding="longest", max_length=max_sequence_length,
                       truncation=True, return_tensors="pt")
    ids = inputs.input_ids.to(device)
    mask = inputs.attention_mask.to(device).bool()
    # The caller's grad mode decides: no_grad for the cache, enabled when a LoRA trains the encoder.
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return [hidden[i][mask[i]] for i in range(len(prompts))]


class ZImageTextCache:
    """Z-Image's text cache (tuneline.models.contracts.TextCache): per caption `prompt_embeds`
    [L, hidden] of only its real tokens (chat template included, cut at max_sequence_length) and
    `attention_mask` [L] (bool, all True: padding is the trainer's), as ZImagePipeline._encode_prompt.
    The key also holds max_sequence_length, which decides a long caption's embedding."""

    format: ClassVar[str] = TEXT_FORMAT
    max_sequence_length: ClassVar[int] = MAX_SEQUENCE_LENGTH  # ZImagePipeline's default
    truncation: ClassVar[str] = f"longer than {MAX_SEQUENCE_LENGTH} tokens (chat template included)"

    def sources(self, model: ModelConfig, root: Path | None) -> dict[str, ComponentSource]:
        from tuneline.models.loading import zimage_text_encoder_sources

        return zimage_text_encoder_sources(model, root)

    def key_fields(self, caption: str, identities: dict[str, str], dtype: str, quantize: str) -> dict[str, Any]:
        from tuneline.models.quantize import cache_key_fields

        return {"family": "zimage", "caption": caption,
                "encoders": identities,  # the tokenizer and the Qwen3 text encoder
                "dtype": dtype, "max_sequence_length": self.max_sequence_length, **cache_key_fields(quantize)}

    def load(self, model: ModelConfig, root: Path | None, dtype: str, device: str) -> Any:
        from tuneline.models.loading import load_zimage_text_encoder

        return load_zimage_text_encoder(model, root, dtype, device)

    def order(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        # A batch is padded to its longest prompt: similar lengths together waste the least
        # (the result does not depend on the batch: the encoder is causal and masked).
        return sorted(items, key=lambda item: (len(item[1]), item[0]))

    def encode(self, models: Any, captions: list[str], device: str) -> list[EncodedText]:
        import torch

        tokenizer, encoder = models
        embeds = encode_prompts(tokenizer, encoder, captions, self.max_sequence_length, device)
        # Untruncated lengths, to tell which captions lost their end (the pipeline cuts them silently).
        full = [len(ids) for ids in tokenizer(chat_prompts(tokenizer, captions)).input_ids]
        results = []
        for embed, tokens in zip(embeds, full, strict=True):
            embed = embed.cpu()
            truncated = tokens > self.max_sequence_length
            results.append(EncodedText(
                {"prompt_embeds": embed, "attention_mask": torch.ones(embed.shape[0], dtype=torch.bool)},
                {"tokens": embed.shape[0], "max_sequence_length": self.max_sequence_length,
                 "truncated": truncated, "untruncated_tokens": tokens},
                truncated))
        return results

    def summary(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}
