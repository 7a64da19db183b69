"""The one rule for whether text embeddings cached ahead of training are valid for a run.

A cached embedding is the frozen encoders' output for the stored caption. Training may see
another caption (dropout and shuffle, tuneline.train.captions) or other encoders (trained text
encoders); then the trainer must encode every step. The latents stage asks this to decide
whether to cache, the memory estimate and the trainer's data whether to use the cache.

Torch-free; it decides whether a cache is made and used, never the bytes of a cached item.
"""

from __future__ import annotations

from tuneline.train.config import TrainConfig


def text_cache_blockers(train: TrainConfig) -> list[str]:
    """Why cached text embeddings would be wrong for this training run (empty when they are valid)."""
    reasons = []
    if train.caption_dropout > 0:
        reasons.append(f"train.caption_dropout is {train.caption_dropout}: dropped captions must be encoded as "
                       "empty prompts at training time")
    if train.caption_shuffle:
        reasons.append("train.caption_shuffle is on: every step sees a different tag order")
    if train.train_text_encoders:
        reasons.append("train.train_text_encoders is on: embeddings change as the encoders learn")
    return reasons
