"""The memory estimate of a configured run (`tuneline check`): what the pipeline decides (the largest
bucket of the data sets, whether the latents stage caches the text this training can use) read from
params, then tuneline.train.memory.estimate on the model's configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneline.train.memory import MemoryEstimate


def largest_bucket(params: Any) -> tuple[tuple[int, int], int]:
    """((width, height), batch size) of the bucket with the most pixels per batch over every data set."""
    cases = [(bucket[0] * bucket[1] * params.bucket.batch_size_for(bucket), bucket)
             for dataset in params.datasets for bucket in params.buckets_for(dataset)]
    if not cases:
        side = params.bucket.resolution if isinstance(params.bucket.resolution, int) else 1024
        return (side, side), params.bucket.batch_size
    _, bucket = max(cases)
    return bucket, params.bucket.batch_size_for(bucket)


def text_cached(params: Any) -> bool:
    """Whether the latents stage caches the text embeddings this training uses (no encoder in the step)."""
    from tuneline.train.cached_text import text_cache_blockers

    return bool(params.latents.text_embeddings) and not text_cache_blockers(params.train)


def estimate_training_memory(params: Any, root: Path, bucket: tuple[int, int] | None = None,
                             batch_size: int | None = None, adapter: Any = None) -> MemoryEstimate:
    """The GPU memory of the train stage on `params`; `bucket`/`batch_size` default to the largest bucket."""
    from tuneline.train.memory import estimate

    if bucket is None or batch_size is None:
        found_bucket, found_batch = largest_bucket(params)
        bucket, batch_size = bucket or found_bucket, batch_size or found_batch
    return estimate(params.model, params.train, root, bucket, batch_size, text_cached=text_cached(params),
                    live_samples=bool(params.render.live_every), adapter=adapter)
