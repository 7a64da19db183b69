"""The validation loss: the training loss of the held-out items at fixed noise levels and fixed noise.

Every held-out item is evaluated at every level of train.validation (timesteps, or sigma = t / 1000
for flow matching) with one noise drawn from (validation seed, item id), so the number moves only
when the weights do (kohya sd-scripts' fixed validation timesteps and seed, PR #1903; SimpleTuner's
eval loss). The items go in batches of one bucket at the bucket's batch size; with several processes
each takes every n-th batch and the sums are added up across processes.

What is reported (`metrics`): `val/loss` (the training loss: noise-level weighting and data-set
weights), `val/loss_unweighted` (plain squared error), `val/loss/<data set>` and `val/loss/t<k>`
(weighted, per data set and per level).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from tuneline.train.adapter import DiffusionAdapter, ValidationData
from tuneline.train.config import ValidationConfig

LOSS = "val/loss"
LOSS_UNWEIGHTED = "val/loss_unweighted"


def level_key(timestep: int) -> str:
    return f"t{timestep}"


@dataclass
class Validation:
    """What the trainer needs to compute the validation loss: the settings, a diffusion adapter (its
    `per_sample_losses`) and the held-out items."""

    config: ValidationConfig
    adapter: DiffusionAdapter
    data: ValidationData

    def due(self, step: int, last: bool) -> bool:
        every = self.config.every_steps
        return every > 0 and (step % every == 0 or last)

    def batches(self) -> list[list[int]]:
        """The held-out items by bucket (buckets in order), in chunks that, every item at every level,
        make one forward of the bucket's batch size (at least one item: a forward of `levels` samples)."""
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for ref in self.data.validation_refs():
            by_bucket[ref.bucket].append(ref.index)
        batches = []
        levels = len(self.config.levels())
        for bucket in sorted(by_bucket):
            size = max(1, self.data.batch_size_for(bucket) // levels)
            indices = by_bucket[bucket]
            batches += [indices[i:i + size] for i in range(0, len(indices), size)]
        return batches

    def metric_names(self) -> list[str]:
        return [LOSS, LOSS_UNWEIGHTED, *(f"{LOSS}/{name}" for name in self.data.validation_datasets()),
                *(f"{LOSS}/{level_key(t)}" for t in self.config.levels())]

    def metrics(self, sums: Any) -> dict[str, float]:
        """The reported means from `sums` [data set, level, (weighted, unweighted, count)] of every process."""
        datasets, levels = self.data.validation_datasets(), self.config.levels()
        total = sums.sum(dim=(0, 1))
        result = {LOSS: float(total[0] / total[2]), LOSS_UNWEIGHTED: float(total[1] / total[2])}
        for d, name in enumerate(datasets):
            part = sums[d].sum(dim=0)
            result[f"{LOSS}/{name}"] = float(part[0] / part[2])
        for k, timestep in enumerate(levels):
            part = sums[:, k].sum(dim=0)
            result[f"{LOSS}/{level_key(timestep)}"] = float(part[0] / part[2])
        return result


def repeat_batch(batch: dict[str, Any], times: int) -> dict[str, Any]:
    """`batch` with every sample repeated `times` times in place (sample-major: s0, s0, ..., s1, ...):
    tensors along their first dimension, lists entry by entry (Z-Image's per-caption embeddings too)."""
    import torch

    repeated: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            repeated[key] = value.repeat_interleave(times, dim=0)
        elif isinstance(value, list):
            repeated[key] = [entry for entry in value for _ in range(times)]
        else:
            repeated[key] = value
    return repeated
