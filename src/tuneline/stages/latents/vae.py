"""The VAE half of the latents stage: decode each captioned image, encode it once, store its
latent distribution.

Per item the store keeps one safetensors file with the VAE's latent distribution (`mean`,
`std` of the diagonal Gaussian, not yet multiplied by the scaling factor, so the trainer
samples fresh noise every step), plus `flip_mean`/`flip_std` of the mirrored image when
`latents.flip` is on. One path for every family: the VAE's scaling and shift factors are
recorded (the trainer applies (z - shift) * scale).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
from PIL import Image

from tuneline.config import Params
from tuneline.core.params import format_resolution
from tuneline.core.packs import open_member
from tuneline.core.store import ItemStore
from tuneline.stages.latents.files import Writer
from tuneline.stages.latents.keys import CODE_VERSION, FORMAT, SUFFIX

# Pipelined encoding (bytes to the GPU, results copied back while the next batch encodes): None
# means on CUDA only. Tests set True to run that path on the CPU (its results are identical).
OVERLAP: bool | None = None

T = TypeVar("T")


@dataclass
class LatentsEncoded:
    """What one encoding pass did, for the report."""

    failed: dict[int, str] = field(default_factory=dict)  # record index -> rejection reason
    fp32_retried: list[str] = field(default_factory=list)  # dataset/id re-encoded in fp32
    vae_load_s: float | None = None  # None: the VAE was not loaded (nothing to encode)


def image_file(captioned_dir: Path, record: dict[str, Any]) -> BinaryIO:
    """The record's image, read from its pack (tuneline.core.packs)."""
    return open_member(captioned_dir, record["image"])


def load_image_bytes(path: Path | BinaryIO) -> Any:
    """RGB image -> uint8 tensor [H, W, 3], as decoded."""
    import torch

    with Image.open(path) as image:
        # Bucketed images are RGB already: no convert() copy for them.
        array = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    return torch.from_numpy(array)


def to_model_input(pixels: Any) -> Any:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1] (contiguous), as the VAE was trained.
    The same elementwise fp32 arithmetic and layout wherever it runs (on the GPU for a batch copied
    there as bytes): a convolution's result can depend on its input's memory layout."""
    import torch

    dims = list(range(pixels.ndim - 3))
    return pixels.permute(*dims, -1, -3, -2).contiguous().to(torch.float32).div_(127.5).sub_(1.0)


def load_pixels(path: Path | BinaryIO) -> Any:
    """RGB image -> float32 tensor [3, H, W] in [-1, 1], as the VAE was trained."""
    return to_model_input(load_image_bytes(path))


def _prefetched(load: Callable[[T], Any], jobs: Iterable[T], workers: int) -> Iterator[Any]:
    """load(job) for each job, in order, computed by `workers` threads ahead of the consumer.

    At most 2 * workers results wait, so memory stays flat however many images there are;
    PNG decoding and the numpy/torch conversion release the GIL, so this overlaps the VAE.
    workers=0 loads in the caller's thread, between VAE calls.
    """
    if workers == 0:
        yield from map(load, jobs)
        return
    jobs = iter(jobs)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="latents-load") as pool:
        pending = deque(pool.submit(load, job) for job in itertools.islice(jobs, 2 * workers))
        while pending:
            result = pending.popleft().result()
            for job in itertools.islice(jobs, 1):
                pending.append(pool.submit(load, job))
            yield result


class LatentEncoder:
    """The VAE, with the classic half-precision guard: a batch that gives NaN/Inf is re-encoded in fp32."""

    def __init__(self, vae: Any, device: str, load_fp32: Callable[[], Any]) -> None:
        import torch

        self.vae = vae
        self.device = device
        self._load_fp32 = load_fp32
        self.dtype = vae.dtype
        self._fp32: Any = None
        self.half = self.dtype in (torch.float16, torch.bfloat16)

    def _encode(self, vae: Any, pixels: Any, dtype: Any) -> tuple[Any, Any]:
        distribution = vae.encode(pixels.to(self.device, dtype, non_blocking=True)).latent_dist
        return distribution.mean, distribution.std

    def encode_queued(self, pixels: Any) -> tuple[Any, Any, Any]:
        """(mean, std, finite per image) on the device, in the VAE's dtype, without waiting for it."""
        import torch

        with torch.inference_mode():
            mean, std = self._encode(self.vae, pixels, self.dtype)
            finite = torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1)
        return mean, std, finite

    def encode_fp32(self, pixels: Any) -> tuple[Any, Any]:
        """The fp32 re-encode of a batch that was not finite in half precision."""
        import torch

        with torch.inference_mode():
            if self._fp32 is None:
                self._fp32 = self._load_fp32()
            return self._encode(self._fp32, pixels, torch.float32)

    def encode(self, pixels: Any) -> tuple[Any, Any, list[int]]:
        """(mean, std, indices of the images whose latents were not finite in half precision).

        When that list is not empty the whole batch was re-encoded in fp32 and the returned
        tensors are fp32; otherwise they are in the VAE's dtype.
        """
        import torch

        with torch.inference_mode():
            mean, std = self._encode(self.vae, pixels, self.dtype)
            if not self.half:
                return mean, std, []
            finite = (torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1)).cpu()
            if bool(finite.all()):
                return mean, std, []
            if self._fp32 is None:
                # A separate fp32 copy, loaded as such (casting a loaded model skips diffusers'
                # keep-in-fp32 rules); later batches keep the fast half-precision VAE.
                self._fp32 = self._load_fp32()
            mean, std = self._encode(self._fp32, pixels, torch.float32)
            return mean, std, [i for i, ok in enumerate(finite.tolist()) if not ok]


def latent_batches(records: list[dict[str, Any]], indices: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by bucket (so every batch is one image size), then chunked."""
    by_bucket: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in indices:
        by_bucket[tuple(records[i]["bucket"])].append(i)
    return [group[start:start + batch_size]
            for _, group in sorted(by_bucket.items()) for start in range(0, len(group), batch_size)]


def encode_latents(params: Params, root: Path, captioned_dir: Path, records: list[dict[str, Any]],
                   todo: list[int], keys: list[str], store: ItemStore, device: str, dtype: str,
                   vae_identity: str) -> LatentsEncoded:
    """Encode records[todo] into the store; `failed` names those that could not be (with the reason)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tuneline.core.report import console
    from tuneline.models.loading import load_vae, release, torch_dtype

    config = params.latents
    store_dtype = torch_dtype(dtype)
    done = LatentsEncoded()
    failed, upcast_names = done.failed, done.fp32_retried
    loading = time.perf_counter()
    vae = load_vae(params.model, root, dtype, device)
    done.vae_load_s = time.perf_counter() - loading
    encoder = LatentEncoder(vae, device, lambda: load_vae(params.model, root, "fp32", device))
    factors = {"scaling_factor": vae.config.scaling_factor,
               "shift_factor": getattr(vae.config, "shift_factor", None)}

    # On a GPU the work is pipelined: threads decode PNGs ahead (as bytes, 4x less to copy than
    # floats; the conversion runs on the GPU), the host copy of batch k's results, the finiteness
    # check and the writes happen while batch k+1 encodes. On the CPU the VAE already runs a thread
    # per core, and one more runnable thread stalls its OpenMP barriers (measured: 0.62x of a bare
    # encode loop with 2 loader threads, 0.8x+ inline): decode between VAE calls.
    overlap = device.startswith("cuda") if OVERLAP is None else OVERLAP
    workers = config.workers if config.workers is not None else (min(4, os.cpu_count() or 1)
                                                                 if device.startswith("cuda") else 0)
    pin = device.startswith("cuda")

    def load(batch: list[int]) -> tuple[list[int], Any, dict[int, str]]:
        tensors, loaded, errors = [], [], {}
        for i in batch:
            try:
                path = image_file(captioned_dir, records[i])
                tensors.append(load_image_bytes(path) if overlap else load_pixels(path))
                loaded.append(i)
            except (OSError, ValueError) as error:  # missing, truncated or not an image
                errors[i] = f"unreadable at latents time: {error}"
        pixels = torch.stack(tensors) if tensors else None
        if pixels is not None and pin:
            pixels = pixels.pin_memory()
        return loaded, pixels, errors

    def encode(pixels: Any) -> tuple[Any, Any, list[int]]:
        mean, std, bad = encoder.encode(pixels)
        return mean.to(store_dtype).cpu(), std.to(store_dtype).cpu(), bad  # one copy per batch, not per item

    def to_host(tensor: Any) -> Any:
        """A copy on the host that the GPU fills while the host goes on (pinned memory)."""
        if not pin:
            return tensor.cpu()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def queue(loaded: list[int], pixels: Any) -> dict[str, Any]:
        """Start encoding one batch (and its mirror image); nothing here waits for the GPU."""
        inputs = to_model_input(pixels.to(device, non_blocking=True))
        views = {"": inputs} | ({"flip_": inputs.flip(-1)} if config.flip else {})
        outputs, finite = {}, {}
        for prefix, view in views.items():
            mean, std, ok = encoder.encode_queued(view)
            outputs |= {f"{prefix}mean": to_host(mean.to(store_dtype)), f"{prefix}std": to_host(std.to(store_dtype))}
            finite[prefix] = to_host(ok)
        event = None
        if pin:
            event = torch.cuda.Event()
            event.record()
        return {"loaded": loaded, "views": views, "outputs": outputs, "finite": finite, "event": event}

    def collect(job: dict[str, Any]) -> tuple[list[int], dict[str, Any], list[int]]:
        """Wait for a queued batch; re-encode in fp32 what was not finite in half precision."""
        if job["event"] is not None:
            job["event"].synchronize()
        outputs, bad = job["outputs"], set()
        if encoder.half:
            for prefix, ok in job["finite"].items():
                if not bool(ok.all()):
                    mean, std = encoder.encode_fp32(job["views"][prefix])
                    outputs[f"{prefix}mean"], outputs[f"{prefix}std"] = mean.to(store_dtype).cpu(), std.to(store_dtype).cpu()
                    bad |= {b for b, good in enumerate(ok.tolist()) if not good}
        return job["loaded"], outputs, sorted(bad)

    def batches_encoded() -> Iterator[tuple[list[int], dict[str, Any], list[int], dict[int, str]]]:
        """(loaded indices, outputs on the host, indices re-encoded in fp32, unreadable) per batch."""
        batches = latent_batches(records, todo, config.batch_size)
        waiting: deque[tuple[dict[str, Any], dict[int, str]]] = deque()
        for loaded, pixels, errors in _prefetched(load, batches, workers):
            if pixels is None:
                yield [], {}, [], errors
                continue
            if not overlap:
                mean, std, bad = encode(pixels)
                outputs = {"mean": mean, "std": std}
                if config.flip:
                    flip_mean, flip_std, flip_bad = encode(pixels.flip(-1))
                    outputs |= {"flip_mean": flip_mean, "flip_std": flip_std}
                    bad = sorted(set(bad) | set(flip_bad))
                yield loaded, outputs, bad, errors
                continue
            waiting.append((queue(loaded, pixels), errors))
            if len(waiting) > 1:  # batch k's results are handled while batch k+1 encodes
                job, job_errors = waiting.popleft()
                yield (*collect(job), job_errors)
        while waiting:
            job, job_errors = waiting.popleft()
            yield (*collect(job), job_errors)

    progress = Progress(TextColumn("latents: encoding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True)
    writer = Writer()
    try:
        with progress:
            bar = progress.add_task("latents", total=len(todo))
            for loaded, outputs, bad, errors in batches_encoded():
                failed.update(errors)
                progress.advance(bar, len(errors))
                if not loaded:
                    continue
                upcast_names.extend(f"{records[loaded[b]]['dataset']}/{records[loaded[b]]['id']}" for b in bad)
                # Still not finite after the fp32 retry, or too large for the stored dtype.
                finite = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in outputs.values()]).all(0).tolist()
                for b, i in enumerate(loaded):
                    if not finite[b]:
                        failed[i] = f"VAE latents are NaN/Inf even in fp32 (or overflow {dtype})"
                        continue
                    tensors = {name: t[b] for name, t in outputs.items()}
                    writer.write(store.path(keys[i], SUFFIX), tensors, {
                        "format": FORMAT,
                        "code_version": CODE_VERSION,
                        "vae": params.model.vae or params.model.base,
                        "vae_identity": vae_identity,
                        "dtype": dtype,
                        "encoded_dtype": "fp32" if bad else dtype,  # a retry re-encodes the whole batch
                        "image_key": records[i]["key"],
                        "bucket": format_resolution(records[i]["bucket"]),
                        "has_flip": config.flip,
                        **factors,
                    })
                progress.advance(bar, len(loaded))
    finally:
        writer.close()
        encoder = vae = None  # drop the models (the closures share `encoder`) so release() frees them
        release(device)
    return done
