"""Bucketed batch order: one bucket per batch, deterministic per (seed, epoch), resumable.

An epoch's batches depend only on the seed, the epoch number and the item list, so
resuming mid-epoch is "rebuild the epoch, skip the batches already done" with no
sampler state beyond (epoch, position). Under DDP every process builds the same list
and takes every num_replicas-th batch, truncated so all processes step equally.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SampleRef:
    """What the sampler needs to know of one item."""

    index: int
    bucket: tuple[int, int]
    repeats: int = 1


class BucketBatchSampler:
    def __init__(
        self,
        items: Sequence[SampleRef],
        batch_size_for: Callable[[tuple[int, int]], int],
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not items:
            raise ValueError("no training items: is the latents stage output empty?")
        self.items = list(items)
        self.batch_size_for = batch_size_for
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every process's batches of `epoch`, in order (item indices)."""
        rng = random.Random(f"{self.seed}:{epoch}")  # str seeds hash stably across runs and versions
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for item in self.items:
            by_bucket[item.bucket].extend([item.index] * item.repeats)
        batches = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            rng.shuffle(members)
            size = self.batch_size_for(bucket)
            # A short last batch is kept: with per-sample loss weights it trains like any other.
            batches.extend(members[i:i + size] for i in range(0, len(members), size))
        rng.shuffle(batches)
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch`."""
        every = self.all_batches(epoch)
        per_process = len(every) // self.num_replicas
        if per_process == 0:
            raise ValueError(f"{len(every)} batches per epoch cannot feed {self.num_replicas} processes")
        return every[self.rank::self.num_replicas][:per_process]

    def __len__(self) -> int:
        """Batches per epoch for this process (the same for every epoch)."""
        total = sum(-(-count // self.batch_size_for(bucket)) for bucket, count in self._bucket_counts().items())
        return total // self.num_replicas

    def _bucket_counts(self) -> dict[tuple[int, int], int]:
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for item in self.items:
            counts[item.bucket] += item.repeats
        return counts
