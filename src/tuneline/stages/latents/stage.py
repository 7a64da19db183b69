"""Stage `latents`: encode every captioned image through the VAE once, and optionally its caption.

Per item the store keeps one safetensors file with the VAE's latent distribution (`mean`,
`std` of the diagonal Gaussian, not yet multiplied by the scaling factor, so the trainer
samples fresh noise every step), plus `flip_mean`/`flip_std` of the mirrored image when
`latents.flip` is on. Its key is the bucket key of the pixels + VAE identity + dtype +
flip + the code version (a digest of the stage's modules): the caption is not in it, so editing a caption costs no VAE work.

The model family (`tuneline.models.family.detect_family`) decides only the text part; the
VAE part is one path for every family (SDXL's 4-channel VAE, Z-Image's 16-channel one with
a shift factor: both factors are recorded, the trainer applies (z - shift) * scale).

Text embeddings are a second, separate cache, one file per caption, keyed by caption + the
identities of the family's tokenizers and text encoders + dtype (+ what else decides them):
- SDXL (`TEXT_FORMAT`): `prompt_embeds` [77, hidden1 + hidden2] and `pooled` [projection],
  as StableDiffusionXLPipeline.encode_prompt.
- Z-Image (`ZIMAGE_TEXT_FORMAT`): `prompt_embeds` [L, hidden] with only the caption's real
  tokens (chat template included, cut at max_sequence_length), and `attention_mask` [L] (bool,
  all True: padding is the trainer's), as ZImagePipeline._encode_prompt; the key also holds
  max_sequence_length.
Either way the manifest record names the file under `text_embeddings` (its key `text_key`).
The cache is only valid while the text encoders are frozen and the caption the trainer sees
is the stored one, so caption dropout, caption shuffle or text-encoder training switch it
off (with the reason in the report).

Sharding. `shard=(i, n)` (`tuneline latents --shard i/n`) encodes only the missing latents
and text embeddings whose key is in shard i of n (tuneline.core.store.in_shard) into the shared
store, and returns without rebuilding the output folder or writing metrics: run the n
shards (on as many workers), then the normal run, which assembles the output from the store.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
from PIL import Image

from tuneline.config import Params
from tuneline.core.codeversion import code_version
from tuneline.stages.latents import CODE
from tuneline.core.params import ParamsError, format_resolution
from tuneline.core.fsutil import atomic_write_bytes, atomic_write_json, digest_json, link_or_copy, rebuilt_dir
from tuneline.core.manifest import MANIFEST, REJECTED, read_manifest, write_jsonl
from tuneline.models.ref import is_tiny
from tuneline.models.zimage.text import MAX_SEQUENCE_LENGTH
from tuneline.core.report import StageReport, console
from tuneline.core.store import ItemStore, in_shard

STAGE = "latents"
TEXT_STAGE = "text_embeddings"  # its own store folder: it can be cleared without losing latents
CODE_VERSION = code_version(CODE)  # changes with the code that makes the items
SUFFIX = ".safetensors"
TEXT_SUFFIX = ".text.safetensors"
METADATA_FILE = "latents.json"
FORMAT = "tuneline-latents"
TEXT_FORMAT = "tuneline-sdxl-text-embeddings"
ZIMAGE_TEXT_FORMAT = "tuneline-zimage-text-embeddings"
# Text encoders are cheap next to the VAE: a fixed batch keeps their memory small and steady.
TEXT_BATCH = 32
# Computed results waiting to be written; bounds memory when the encoder outruns the disk.
MAX_PENDING_WRITES = 64
# Images named in the fp32-retry warning; a stock SDXL VAE in fp16 would list every image.
MAX_NAMED = 20
# Pipelined encoding (bytes to the GPU, results copied back while the next batch encodes): None
# means on CUDA only. Tests set True to run that path on the CPU (its results are identical).
OVERLAP: bool | None = None

T = TypeVar("T")


def text_cache_blockers(caption_dropout: float, caption_shuffle: bool, text_encoders_trained: bool) -> list[str]:
    """Why cached text embeddings would be wrong for this training run (empty when they are valid)."""
    reasons = []
    if caption_dropout > 0:
        reasons.append(f"train.caption_dropout is {caption_dropout}: dropped captions must be encoded as "
                       "empty prompts at training time")
    if caption_shuffle:
        reasons.append("train.caption_shuffle is on: every step sees a different tag order")
    if text_encoders_trained:
        reasons.append("train.train_text_encoders is on: embeddings change as the encoders learn")
    return reasons


def training_text_blockers(params: Params) -> list[str]:
    """text_cache_blockers with the train section's values (defaults while it does not exist)."""
    train = getattr(params, "train", None)
    return text_cache_blockers(
        float(getattr(train, "caption_dropout", 0.0) or 0.0),
        bool(getattr(train, "caption_shuffle", False)),
        bool(getattr(train, "train_text_encoders", False)),
    )


def latent_key(image_key: str, vae_identity: str, dtype: str, flip: bool) -> str:
    return digest_json({
        "stage": STAGE,
        "code": CODE_VERSION,
        "pixels": image_key,  # the bucket key: everything that decided the image's pixels
        "vae": vae_identity,
        "dtype": dtype,
        "flip": flip,
    })


def text_key(caption: str, encoder_identities: dict[str, str], dtype: str) -> str:
    """SDXL's text-embedding key."""
    return digest_json({
        "stage": TEXT_STAGE,
        "code": CODE_VERSION,
        "caption": caption,
        "encoders": encoder_identities,  # both tokenizers and both text encoders
        "dtype": dtype,
    })


def zimage_text_key(caption: str, encoder_identities: dict[str, str], dtype: str,
                    max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> str:
    """Z-Image's text-embedding key: the cut-off length decides a long caption's embedding."""
    return digest_json({
        "stage": TEXT_STAGE,
        "code": CODE_VERSION,
        "family": "zimage",
        "caption": caption,
        "encoders": encoder_identities,  # the tokenizer and the Qwen3 text encoder
        "dtype": dtype,
        "max_sequence_length": max_sequence_length,
    })


class SDXLTextCache:
    """SDXL's text cache: both CLIP encoders' penultimate hidden states and the pooled projection."""

    family: ClassVar[str] = "sdxl"
    format: ClassVar[str] = TEXT_FORMAT

    def sources(self, model: Any, root: Path) -> dict[str, Any]:
        from tuneline.models.loading import text_encoder_sources

        return text_encoder_sources(model, root)

    def key(self, caption: str, identities: dict[str, str], dtype: str) -> str:
        return text_key(caption, identities, dtype)

    def load(self, model: Any, root: Path, dtype: str, device: str) -> Any:
        from tuneline.models.loading import load_text_encoders

        return load_text_encoders(model, root, dtype, device)

    def order(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return items  # every prompt is padded to 77 tokens: batching order changes no cost

    def encode(self, models: Any, captions: list[str], device: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(tensors, extra metadata) per caption."""
        from tuneline.models.sdxl.text import encode_prompts

        tokenizers, encoders = models
        embeds, pooled = encode_prompts(tokenizers, encoders, captions, device)
        return [({"prompt_embeds": embeds[b].cpu(), "pooled": pooled[b].cpu()}, {}) for b in range(len(captions))]

    def summary(self) -> dict[str, Any]:
        return {}


class ZImageTextCache:
    """Z-Image's text cache: the Qwen3 encoder's hidden_states[-2] of each caption's real tokens."""

    family: ClassVar[str] = "zimage"
    format: ClassVar[str] = ZIMAGE_TEXT_FORMAT
    max_sequence_length: ClassVar[int] = MAX_SEQUENCE_LENGTH  # ZImagePipeline's default

    def sources(self, model: Any, root: Path) -> dict[str, Any]:
        from tuneline.models.loading import zimage_text_encoder_sources

        return zimage_text_encoder_sources(model, root)

    def key(self, caption: str, identities: dict[str, str], dtype: str) -> str:
        return zimage_text_key(caption, identities, dtype, self.max_sequence_length)

    def load(self, model: Any, root: Path, dtype: str, device: str) -> Any:
        from tuneline.models.loading import load_zimage_text_encoder

        return load_zimage_text_encoder(model, root, dtype, device)

    def order(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        # A batch is padded to its longest prompt: similar lengths together waste the least
        # (the result does not depend on the batch: the encoder is causal and masked).
        return sorted(items, key=lambda item: (len(item[1]), item[0]))

    def encode(self, models: Any, captions: list[str], device: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        import torch

        from tuneline.models.zimage.text import chat_prompts, encode_prompts

        tokenizer, encoder = models
        embeds = encode_prompts(tokenizer, encoder, captions, self.max_sequence_length, device)
        # Untruncated lengths, to tell which captions lost their end (the pipeline cuts them silently).
        full = [len(ids) for ids in tokenizer(chat_prompts(tokenizer, captions)).input_ids]
        results = []
        for embed, tokens in zip(embeds, full, strict=True):
            embed = embed.cpu()
            results.append(({"prompt_embeds": embed, "attention_mask": torch.ones(embed.shape[0], dtype=torch.bool)},
                            {"tokens": embed.shape[0], "max_sequence_length": self.max_sequence_length,
                             "truncated": tokens > self.max_sequence_length, "untruncated_tokens": tokens}))
        return results

    def summary(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}


TEXT_CACHES: dict[str, Any] = {"sdxl": SDXLTextCache(), "zimage": ZImageTextCache()}


def text_cache(family: str) -> Any:
    """The text-embedding cache of a model family."""
    try:
        return TEXT_CACHES[family]
    except KeyError:
        raise ParamsError(f"the latents stage has no text-embedding cache for model family {family!r}; "
                          f"families: {', '.join(sorted(TEXT_CACHES))}") from None


def family_notes(params: Params, family: str) -> list[str]:
    """Set options that belong to another family and so change nothing here (reported, not silently dropped)."""
    notes: list[str] = []
    if family != "zimage":
        return notes
    train = getattr(params, "train", None)
    second = getattr(getattr(train, "text_encoder_2", None), "mode", "frozen")
    if second != "frozen":
        notes.append(f"train.text_encoder_2.mode is {second!r}, but Z-Image has one text encoder (Qwen3, "
                     "train.text_encoder_1); SDXL's second encoder does not exist here (it still turns the text "
                     "cache off, as any trained text encoder does)")
    if params.model.config:
        notes.append(f"model.config ({params.model.config!r}) describes a single-file SDXL base; a Z-Image base "
                     "is a diffusers folder or hub id, so it is not used")
    return notes


def caption_of(record: dict[str, Any]) -> str:
    # No caption trains the image unconditionally: SDXL's empty prompt.
    return record.get("caption") or ""


def image_path(captioned_dir: Path, record: dict[str, Any]) -> Path:
    return Path(captioned_dir) / record.get("image", f"{record['dataset']}/{record['id']}.png")


def load_image_bytes(path: Path) -> Any:
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


def load_pixels(path: Path) -> Any:
    """RGB image -> float32 tensor [3, H, W] in [-1, 1], as the VAE was trained."""
    return to_model_input(load_image_bytes(path))


def read_latent_header(path: Path) -> tuple[dict[str, str], list[int]]:
    """(safetensors metadata, shape of `mean`) without reading the tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}, list(handle.get_slice("mean").get_shape())


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


def _latent_batches(records: list[dict[str, Any]], indices: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by bucket (so every batch is one image size), then chunked."""
    by_bucket: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in indices:
        by_bucket[tuple(records[i]["bucket"])].append(i)
    return [group[start:start + batch_size]
            for _, group in sorted(by_bucket.items()) for start in range(0, len(group), batch_size)]


def _safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return save({name: t.contiguous() for name, t in tensors.items()}, metadata=text)


class _Writer:
    """Atomic store writes in a background thread, at most MAX_PENDING_WRITES behind."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latents-write")
        self._pending: deque[Future[None]] = deque()

    def write(self, path: Path, tensors: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._pending.append(self._pool.submit(lambda: atomic_write_bytes(path, _safetensors_bytes(tensors, metadata))))
        while len(self._pending) > MAX_PENDING_WRITES:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


def _encode_latents(params: Params, root: Path, captioned_dir: Path, records: list[dict[str, Any]],
                    todo: list[int], keys: list[str], store: ItemStore, device: str, dtype: str,
                    vae_identity: str, report: StageReport, family: str = "sdxl") -> dict[int, str]:
    """Encode records[todo] into the store; return {index: rejection reason} for those that failed."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tuneline.models.loading import load_vae, release, torch_dtype

    config = params.latents
    store_dtype = torch_dtype(dtype)
    failed: dict[int, str] = {}
    loading = time.perf_counter()
    vae = load_vae(params.model, root, dtype, device)
    report.extra["vae_loaded"] = True
    report.extra["vae_load_s"] = round(time.perf_counter() - loading, 3)
    encoder = LatentEncoder(vae, device, lambda: load_vae(params.model, root, "fp32", device))
    factors = {"scaling_factor": vae.config.scaling_factor,
               "shift_factor": getattr(vae.config, "shift_factor", None)}
    upcast_names: list[str] = []

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
                path = image_path(captioned_dir, records[i])
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
        batches = _latent_batches(records, todo, config.batch_size)
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
    writer = _Writer()
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
    if upcast_names:
        report.extra["fp32_retries"] = len(upcast_names)
        named = ", ".join(upcast_names[:MAX_NAMED])
        more = f" and {len(upcast_names) - MAX_NAMED} more" if len(upcast_names) > MAX_NAMED else ""
        hint = ("The stock SDXL VAE overflows in fp16; a fixed VAE (model.vae: madebyollin/sdxl-vae-fp16-fix) "
                "or latents.dtype bf16/fp32 avoids the retries." if family == "sdxl"
                else "latents.dtype bf16 or fp32 avoids the retries.")
        report.warnings.append(
            f"{len(upcast_names)} image(s) gave NaN/Inf latents in {dtype} and were re-encoded in fp32: "
            f"{named}{more}. {hint}"
        )
    return failed


def _encode_texts(params: Params, root: Path, missing: dict[str, str], text_store: ItemStore, device: str,
                  dtype: str, identities: dict[str, str], cache: Any) -> list[str]:
    """Encode each missing caption once ({key: caption}) into the text store, with the family's
    `cache`; return the captions that were cut at the encoder's maximum length."""
    import torch

    from tuneline.models.loading import release

    models = cache.load(params.model, root, dtype, device)
    writer = _Writer()
    truncated: list[str] = []
    try:
        items = cache.order(sorted(missing.items()))
        for start in range(0, len(items), TEXT_BATCH):
            chunk = items[start:start + TEXT_BATCH]
            with torch.inference_mode():
                encoded = cache.encode(models, [caption for _, caption in chunk], device)
            for (key, caption), (tensors, extra) in zip(chunk, encoded, strict=True):
                if extra.get("truncated"):
                    truncated.append(caption)
                writer.write(text_store.path(key, SUFFIX), tensors,
                             {"format": cache.format, "code_version": CODE_VERSION, "caption": caption,
                              "dtype": dtype, "encoders": identities, **extra})
    finally:
        writer.close()
        del models
        release(device)
    return truncated


def run(params: Params, root: Path, captioned_dir: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None, shard: tuple[int, int] | None = None) -> StageReport:
    """Cache the latents (and, when valid, text embeddings) of every item of `captioned_dir` into `out_dir`.

    With `shard=(i, n)`: only compute shard i's missing entries into the store (see the module docstring).
    """
    from tuneline.models.loading import resolve_device, resolve_dtype, vae_source
    from tuneline.models.family import detect_family

    started = time.perf_counter()
    root = Path(root)
    config = params.latents
    report = StageReport(STAGE)
    records = read_manifest(captioned_dir)
    store = ItemStore(root / params.store_dir, STAGE)
    text_store = ItemStore(root / params.store_dir, TEXT_STAGE)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    vae_identity = vae_source(params.model, root).identity(root)
    family = detect_family(params.model, root)
    cache = text_cache(family)
    report.extra["family"] = family
    report.warnings.extend(family_notes(params, family))

    # Text cache: decided (and its keys computed) before any model loads, so a bad base fails fast.
    blockers = training_text_blockers(params) if config.text_embeddings else []
    identities: dict[str, str] = {}
    if config.text_embeddings and not blockers:
        try:
            identities = {name: source.identity(root) for name, source in cache.sources(params.model, root).items()}
        except ParamsError as error:
            blockers.append(str(error))
    text_on = config.text_embeddings and not blockers

    keys = [latent_key(record["key"], vae_identity, dtype, config.flip) for record in records]
    todo = [i for i, key in enumerate(keys) if not store.has(key, SUFFIX) and in_shard(key, shard)]
    report.extra["vae_loaded"] = False
    failed = _encode_latents(params, root, captioned_dir, records, todo, keys, store, device, dtype,
                             vae_identity, report, family) if todo else {}
    report.computed = len(todo) - len(failed)

    text_keys = [cache.key(caption_of(r), identities, dtype) if text_on else None for r in records]
    missing_text = {key: caption_of(r) for key, r in zip(text_keys, records)
                    if key is not None and not text_store.has(key, SUFFIX) and in_shard(key, shard)}
    report.extra["text_encoders_loaded"] = bool(missing_text)
    if missing_text:
        truncated = _encode_texts(params, root, missing_text, text_store, device, dtype, identities, cache)
        if truncated:
            report.extra["captions_truncated"] = len(truncated)
            named = "; ".join(repr(c[:60] + "...") for c in truncated[:MAX_NAMED])
            report.warnings.append(
                f"{len(truncated)} caption(s) are longer than {cache.max_sequence_length} tokens (chat template "
                f"included) and were cut there, as the pipeline cuts them: {named}")
    if shard is not None:  # a shard only fills the store; the unsharded run writes the output
        for i in sorted(failed):
            report.reject(records[i].get("source", records[i]["id"]), failed[i], dataset=records[i]["dataset"])
        report.extra.update({"shard": f"{shard[0]}/{shard[1]}", "text_embeddings_computed": len(missing_text),
                             "device": device, "dtype": dtype})
        report.seconds = time.perf_counter() - started
        return report

    manifest = []
    factors: dict[str, Any] = {"scaling_factor": None, "shift_factor": None}
    with rebuilt_dir(out_dir) as staging:
        for i, (record, key) in enumerate(zip(records, keys)):
            if i in failed:
                report.reject(record.get("source", record["id"]), failed[i], dataset=record["dataset"])
                continue
            latents = f"{record['dataset']}/{record['id']}{SUFFIX}"
            link_or_copy(store.path(key, SUFFIX), staging / latents)
            # The stored file carries its VAE's factors: a fully cached run never needs the VAE config.
            metadata, shape = read_latent_header(store.path(key, SUFFIX))
            factors = {name: json.loads(metadata[name]) for name in factors}
            texts = None
            if text_keys[i] is not None:
                texts = f"{record['dataset']}/{record['id']}{TEXT_SUFFIX}"
                link_or_copy(text_store.path(text_keys[i], SUFFIX), staging / texts)
            manifest.append({
                **record,
                "latents": latents,
                "latent_key": key,
                "latent_shape": shape,
                "latent_dtype": dtype,
                **factors,
                "has_flip": config.flip,
                "text_embeddings": texts,
                "text_key": text_keys[i],
            })
        report.reused = len(manifest) - report.computed
        summary = {
            "family": family,
            "vae": params.model.vae or params.model.base,
            "vae_identity": vae_identity,
            "dtype": dtype,
            **factors,
            "flip": config.flip,
            "latent_stores": "mean and std of the VAE's latent distribution, not scaled: "
                             "sample, then (latent - shift_factor) * scaling_factor",
            "text_embeddings": text_on,
            "text_embeddings_off_because": blockers if config.text_embeddings else ["latents.text_embeddings: false"],
            "text_encoders": identities,
            "text_embeddings_format": cache.format if text_on else None,
            **(cache.summary() if text_on else {}),
            "random_tiny_model": is_tiny(params.model.base) or is_tiny(params.model.vae or ""),
        }
        write_jsonl(staging / MANIFEST, manifest)
        write_jsonl(staging / REJECTED, report.rejected)
        atomic_write_json(staging / METADATA_FILE, summary)

    unique_text = {k for k in text_keys if k is not None}
    report.extra["text_embeddings"] = "cached" if text_on else "off: " + "; ".join(summary["text_embeddings_off_because"])
    report.extra["text_embeddings_computed"] = len(missing_text)
    report.extra["text_embeddings_reused"] = len(unique_text) - len(missing_text)
    report.extra["empty_captions"] = sum(1 for r in manifest if not caption_of(r))
    report.extra["device"] = device
    report.extra["dtype"] = dtype
    if summary["random_tiny_model"]:
        report.extra["model"] = f"{params.model.base} (tiny RANDOM weights: latents mean nothing)"
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
    return report
