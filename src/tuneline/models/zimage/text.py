"""Z-Image's prompt encoding: one Qwen3 decoder LM, its second-to-last hidden state, one
variable-length embedding per prompt (what `ZImagePipeline._encode_prompt` computes).

The prompt goes through the tokenizer's chat template as a user message with the generation
prompt (as the pipeline does), is cut at `max_sequence_length` tokens (template included) and
encoded with its attention mask; the padding rows are dropped. Padding to the batch's longest
prompt instead of the pipeline's fixed `max_length` gives the same rows: the text encoder is
causal and masked, so a real token never sees a pad token (tests/test_latents_zimage.py checks
this against the pipeline's own encode).
"""

from __future__ import annotations

from typing import Any

# ZImagePipeline's default max_sequence_length.
MAX_SEQUENCE_LENGTH = 512


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
