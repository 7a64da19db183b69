"""Training samples from the latents stage: cached latent distributions, captions, SDXL sizes.

Latents are sampled from the stored distribution (mean + std * noise) with the trainer's
generator, so every epoch sees a fresh sample and resume stays exact. Cached text embeddings
are stacked (SDXL: fixed length, with pooled ones) or, when the files hold no `pooled`
(Z-Image), handed over as a list of [tokens, hidden] tensors of their own lengths.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.core.packs import read_member
from tuneline.core.params import ParamsError, format_resolution
from tuneline.core.manifest import read_manifest
from tuneline.core.split import TRAIN, VALIDATION
from tuneline.models.loading import host_to_device
from tuneline.train.cached_text import text_cache_blockers
from tuneline.train.captions import augment_caption
from tuneline.train.config import TrainConfig
from tuneline.train.prior import BATCH_KEY as PRIOR_BATCH_KEY
from tuneline.train.sampler import SampleRef


NO_STRUCTURE = (0.0, 0.0, 0.0, 0.0)
# The latents manifest's reference to an item's mask at latent resolution (stages/latents: a safetensors
# file with `mask`, float [1, h, w] in 0..1); absent for items without a mask.
MASK_FIELD = "latent_mask"


@dataclass(frozen=True)
class DatasetWeights:
    """How much one data set counts in training: times seen per epoch, weight in the loss, and its
    style/structure weights (struct, light, color, tex: train.loss.structure with its own overrides);
    `prior`: a regularization data set's kind (tuneline.train.prior: class_images, prior_prediction), None
    for one that trains."""

    repeats: int = 1
    loss_weight: float = 1.0
    structure: tuple[float, float, float, float] = NO_STRUCTURE
    prior: str | None = None


@dataclass(frozen=True)
class LatentItem:
    index: int
    record: dict[str, Any]
    bucket: tuple[int, int]
    repeats: int
    loss_weight: float
    structure: tuple[float, float, float, float] = NO_STRUCTURE
    prior: str | None = None  # its data set's regularization kind (DatasetWeights.prior)


class LatentData:
    """The latents stage's output folder as training items.

    `datasets`: data set folder name -> its weights (items of other data sets are left out: removed
    from params.yaml since the latents were cached); `batch_size_for(bucket)`: the bucket stage's
    batch size of a bucket (width, height).

    `items` are the records the latents stage marked `split: train` (a record without the field
    is one: manifests written before the split existed); the held-out ones (`split: validation`,
    `datasets[].validation`) are in `validation`, indexed on their own, and never in `items`, so
    no sampler reference or training batch can reach them."""

    def __init__(self, latents_dir: Path, train: TrainConfig, datasets: Mapping[str, DatasetWeights],
                 batch_size_for: Callable[[tuple[int, int]], int]) -> None:
        self.train = train
        self.dir = Path(latents_dir)
        self._batch_size_for = batch_size_for
        records = read_manifest(self.dir)
        if not records:
            raise ParamsError(f"{self.dir}: no latents to train on (run the earlier stages first)")
        self.items: list[LatentItem] = []
        # Held-out items (datasets[].validation): never in a training batch; the validation loss reads them.
        self.validation: list[LatentItem] = []
        for record in records:
            dataset = datasets.get(record["dataset"])
            if dataset is None:
                continue
            side = record.get("split", TRAIN)
            if side not in (TRAIN, VALIDATION):
                raise ParamsError(f"{self.dir}: item {record['id']} has split {side!r}; expected {TRAIN!r} or "
                                  f"{VALIDATION!r} (rerun latents)")
            kept = self.items if side == TRAIN else self.validation
            kept.append(LatentItem(len(kept), record, tuple(record["bucket"]), dataset.repeats, dataset.loss_weight,
                                   dataset.structure, dataset.prior))
        if not self.items:
            raise ParamsError(f"{self.dir}: every item is held out for validation (datasets[].validation): "
                              "nothing to train on; hold out fewer images or add a data set that trains")
        if train.flip and not all(item.record.get("has_flip") for item in self.items):
            raise ParamsError("train.flip: true needs flipped latents: set latents.flip: true and rerun latents")
        self.scaling_factor = float(records[0].get("scaling_factor") or 0.13025)
        self.shift_factor = float(records[0].get("shift_factor") or 0.0)
        self.text_cache = self._text_cache_usable()
        # Batches carry each sample's style/structure weights only when some item has one: with all 0 the
        # adapters compute exactly the loss they computed before the setting existed.
        self.structure = any(any(item.structure) for item in [*self.items, *self.validation])
        # Batches carry a loss mask (train.masked_loss) only when it is on and some item has one: else the adapters
        # compute exactly the plain loss.
        self.masked = train.masked_loss.enabled and any(item.record.get(MASK_FIELD)
                                                        for item in [*self.items, *self.validation])
        # Batches say each sample's prior (tuneline.train.prior) only when some data set regularizes: without one
        # the adapters compute and log exactly what they did before the setting existed.
        self.regularization = any(item.prior for item in [*self.items, *self.validation])
        if self.regularization and all(item.prior for item in self.items):
            raise ParamsError(f"{self.dir}: every training item belongs to a regularization data set "
                              "(datasets[].role: regularization): add a data set with role: train")

    def _text_cache_usable(self) -> bool:
        cached = all(item.record.get("text_embeddings") for item in [*self.items, *self.validation])
        return cached and not text_cache_blockers(self.train)

    def sample_refs(self) -> list[SampleRef]:
        return [SampleRef(item.index, item.bucket, item.repeats) for item in self.items]

    def batch_size_for(self, bucket: tuple[int, int]) -> int:
        return self._batch_size_for(bucket)

    def batching(self) -> dict[str, int]:
        """Batch size of every bucket trained on: with the seed and the items, it fixes the batch sequence."""
        buckets = sorted({item.bucket for item in self.items})
        return {format_resolution(bucket): self._batch_size_for(bucket) for bucket in buckets}

    def digest(self) -> str:
        """Digest of what is trained on (latent and text keys, captions, weights) and of what is held out:
        the data identity. Without held-out items it is the digest runs had before the split existed
        (they keep their run key); a changed split is a different run. An item's style/structure weights
        count only when one is not 0, its regularization kind only when it has one: without them the digest
        is the one runs had before they existed."""
        from tuneline.core.fsutil import digest_json

        def entries(items: list[LatentItem]) -> list[list[Any]]:
            return [[i.record.get("latent_key"), i.record.get("caption"), i.repeats, i.loss_weight,
                     *([list(i.structure)] if any(i.structure) else []),
                     # the mask trained on, only with masked loss (else the digest runs had before masks)
                     *([{"mask": i.record.get("latent_mask_key")}] if self.masked else []),
                     *([{"prior": i.prior}] if i.prior else [])] for i in items]

        if not self.validation:
            return digest_json(entries(self.items))
        return digest_json({TRAIN: entries(self.items), VALIDATION: entries(self.validation)})

    def batch(self, indices: list[int], generator: Any, python_rng: random.Random, device: Any) -> dict[str, Any]:
        """Load, sample and stack one batch (all items share a bucket).

        The stored distributions are stacked on the host and copied to `device` without waiting
        for it (pinned memory on CUDA); the noise is drawn on the generator's device, where the
        sample is made: no step waits for the GPU here. Elementwise fp32 arithmetic, so the result
        does not depend on where it runs.
        """
        import torch
        from safetensors.torch import load

        train = self.train
        means, stds, noises, captions, crops, texts, masks = [], [], [], [], [], [], []
        items = [self.items[index] for index in indices]
        for item in items:  # the RNG draws in item order: flip, noise, caption (exact resume)
            tensors = load(read_member(self.dir, item.record["latents"]))
            flip = train.flip and python_rng.random() < 0.5
            mean, std = (tensors["flip_mean"], tensors["flip_std"]) if flip else (tensors["mean"], tensors["std"])
            if self.masked:  # the mask mirrored with the latent it weights
                mask = self._mask(item, mean)
                masks.append(mask.flip(-1) if flip else mask)
            means.append(mean)
            stds.append(std)
            noises.append(torch.randn(mean.shape, generator=generator, device=generator.device))
            top, left = item.record["crop_top_left"]
            if flip:  # the crop's left edge, seen in the mirrored resized image
                left = item.record["resized_size"][0] - left - item.bucket[0]
            crops.append((top, left))
            captions.append(augment_caption(item.record.get("caption") or "", train, python_rng))
            if self.text_cache:
                texts.append(load(read_member(self.dir, item.record["text_embeddings"])))
        return self._assemble(items, means, stds, noises, crops, captions, texts, device, masks)

    def _mask(self, item: LatentItem, mean: Any) -> Any:
        """The item's mask at latent resolution, [1, h, w] float32; all ones (train everywhere) without one."""
        import torch
        from safetensors.torch import load

        ref = item.record.get(MASK_FIELD)
        if not ref:
            return torch.ones((1, *mean.shape[-2:]), dtype=torch.float32)
        mask = load(read_member(self.dir, ref))["mask"].float()
        if tuple(mask.shape[-2:]) != tuple(mean.shape[-2:]):
            raise ParamsError(f"{self.dir}: item {item.record['id']}'s mask is {list(mask.shape)}, its latent "
                              f"{list(mean.shape)}: rerun latents")
        return mask

    def validation_refs(self) -> list[SampleRef]:
        """The held-out items, indexed into `validation`, each once."""
        return [SampleRef(index, item.bucket, 1) for index, item in enumerate(self.validation)]

    def validation_datasets(self) -> list[str]:
        return sorted({item.record["dataset"] for item in self.validation})

    def validation_batch(self, indices: list[int], seed: int, device: Any) -> dict[str, Any]:
        """A batch of the held-out items at `indices` (one bucket) whose every draw is fixed per item:
        the latent sample and the diffusion noise (`noise`) come from a CPU generator seeded with (seed,
        item id), so they do not depend on the batch, the process, the device or the training streams.
        No flip, no caption augmentation; `datasets` names each item's data set."""
        import torch
        from safetensors.torch import load

        means, stds, noises, diffusion_noise, crops, captions, texts, masks = [], [], [], [], [], [], [], []
        items = [self.validation[index] for index in indices]
        for item in items:
            generator = torch.Generator(device="cpu").manual_seed(item_seed(seed, item.record["id"]))
            tensors = load(read_member(self.dir, item.record["latents"]))
            means.append(tensors["mean"])
            stds.append(tensors["std"])
            if self.masked:
                masks.append(self._mask(item, tensors["mean"]))
            noises.append(torch.randn(tensors["mean"].shape, generator=generator))
            diffusion_noise.append(torch.randn(tensors["mean"].shape, generator=generator))
            crops.append(tuple(item.record["crop_top_left"]))
            captions.append(item.record.get("caption") or "")
            if self.text_cache:
                texts.append(load(read_member(self.dir, item.record["text_embeddings"])))
        batch = self._assemble(items, means, stds, noises, crops, captions, texts, device, masks)
        batch["noise"] = host_to_device(torch.stack(diffusion_noise), device)
        return batch

    def _assemble(self, items: list[LatentItem], means: list[Any], stds: list[Any], noises: list[Any],
                  crops: list[tuple[int, int]], captions: list[str], texts: list[dict[str, Any]],
                  device: Any, masks: list[Any] | None = None) -> dict[str, Any]:
        """Stack the loaded parts of a batch into what the adapters read."""
        import torch

        mean = host_to_device(torch.stack(means), device).float()
        std = host_to_device(torch.stack(stds), device).float()
        sample = mean + std * torch.stack(noises).to(mean.device)
        batch = {
            "latents": (sample - self.shift_factor) * self.scaling_factor,
            "captions": captions,
            "original_size": [item.record["original_size"] for item in items],
            "crop_top_left": crops,
            "target_size": [item.bucket for item in items],
            "loss_weight": host_to_device(torch.tensor([item.loss_weight for item in items],
                                                       dtype=torch.float32), device),
            "ids": [item.record["id"] for item in items],
            "datasets": [item.record["dataset"] for item in items],
        }
        if self.regularization:  # each sample's prior kind, None for a sample that trains (a host list)
            batch[PRIOR_BATCH_KEY] = [item.prior for item in items]
        if self.structure:  # (batch, 4): struct, light, color, tex of each sample's data set
            batch["structure"] = host_to_device(torch.tensor([item.structure for item in items], dtype=torch.float32),
                                                device)
        if masks:  # (batch, 1, h, w): train.masked_loss's weights before the unmasked_weight floor
            batch["mask"] = host_to_device(torch.stack(masks), device)
        embeds = [text["prompt_embeds"] for text in texts]
        pooled = [text.get("pooled") for text in texts]
        if self.text_cache and all(p is None for p in pooled):
            # Z-Image: one [tokens, hidden] embedding per caption, of its own length, no pooled one.
            batch["prompt_embeds"] = [host_to_device(embed, device) for embed in embeds]
        elif self.text_cache:
            batch["prompt_embeds"] = host_to_device(torch.stack(embeds), device)
            batch["pooled"] = host_to_device(torch.stack(pooled), device)
        return batch


def item_seed(seed: int, item_id: str) -> int:
    """A generator seed from the validation seed and an item's content id (stable across runs and machines)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}".encode()).digest()[:7], "big")


def read_latents_summary(latents_dir: Path) -> dict[str, Any]:
    path = Path(latents_dir) / "latents.json"
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}
