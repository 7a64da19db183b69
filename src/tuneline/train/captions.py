"""Caption augmentation at training time: dropout and tag shuffle (kohya's semantics)."""

from __future__ import annotations

import random

from tuneline.train.config import TrainConfig


def augment_caption(caption: str, config: TrainConfig, rng: random.Random) -> str:
    """The caption a sample trains on this step; `rng` is the trainer's seeded generator.

    Dropout replaces the whole caption with "" (trains the unconditional prediction that
    classifier-free guidance needs). Shuffle splits on the separator, keeps the first
    `keep_tokens` tags (the trigger word) in place and shuffles the rest.
    """
    # Draw both numbers every time, so the random stream does not depend on the caption.
    drop, shuffle_seed = rng.random(), rng.getrandbits(32)
    if drop < config.caption_dropout:
        return ""
    if not config.caption_shuffle:
        return caption
    separator = config.caption_separator
    tags = [tag.strip() for tag in caption.split(separator) if tag.strip()]
    if len(tags) < max(config.shuffle_min_tokens, config.keep_tokens + 2):
        return caption
    head, tail = tags[:config.keep_tokens], tags[config.keep_tokens:]
    random.Random(shuffle_seed).shuffle(tail)
    joiner = separator if separator.endswith(" ") or separator.isspace() else f"{separator} "
    return joiner.join(head + tail)
