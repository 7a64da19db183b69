"""Florence-2 through transformers' native classes: load once, caption in batches, unload.

No `trust_remote_code`: `Florence2ForConditionalGeneration` and `AutoProcessor` ship with
transformers, so a hub id must name a checkpoint in the native layout (for example
florence-community/Florence-2-base); a local folder in that layout works offline.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tuneline.core.logs import quiet_libraries
from tuneline.stages.caption.text import clean_caption
from tuneline.core.params import ParamsError

T = TypeVar("T")
R = TypeVar("R")

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class CaptionOutOfMemory(RuntimeError):
    """Even one image at a time does not fit: the message says what to change."""


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """`auto` -> CUDA with bf16 (fp16 where bf16 is unsupported) when there is a GPU, else CPU fp32."""
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    elif device == "cuda" and not has_cuda:
        raise ParamsError("caption.device: 'cuda', but torch sees no CUDA GPU here; use 'auto' or 'cpu'")
    if dtype == "auto":
        if device == "cuda":
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            dtype = "fp32"  # half precision on CPU is slower than fp32 and changes the captions
    return device, dtype


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


@dataclass
class Florence:
    """A loaded Florence-2 model and processor with the stage's generation settings."""

    model: Any
    processor: Any
    device: str
    dtype: str
    task: str
    num_beams: int
    max_new_tokens: int

    def caption(self, images: Sequence[Any]) -> list[tuple[str, str]]:
        """(decoded model output, cleaned caption) for each PIL image, in one generate call."""
        import torch

        inputs = self.processor(text=[self.task] * len(images), images=list(images), return_tensors="pt")
        with torch.inference_mode():
            generated = self.model.generate(
                input_ids=inputs["input_ids"].to(self.device),
                attention_mask=inputs["attention_mask"].to(self.device),
                pixel_values=inputs["pixel_values"].to(self.device, getattr(torch, TORCH_DTYPES[self.dtype])),
                max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams,
                do_sample=False,  # captions must be a function of the key: no sampling
            )
        decoded = self.processor.batch_decode(generated, skip_special_tokens=False)
        results = []
        for text, image in zip(decoded, images, strict=True):
            parsed = self.processor.post_process_generation(text, task=self.task, image_size=image.size)[self.task]
            results.append((text, clean_caption(parsed)))
        return results

    def unload(self) -> None:
        """Drop the weights now, not at interpreter exit: the next stage may need the GPU."""
        self.model = None
        self.processor = None
        free_memory(self.device)


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def load_florence(source: Path | str, revision: str | None, device: str, dtype: str, task: str,
                  num_beams: int, max_new_tokens: int) -> Florence:
    """Load model and processor from a local folder or a hub id (resolved by tuneline.models.ref)."""
    import torch
    quiet_libraries()  # before the import: it warns while importing
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    # A revision only means something for a hub id; local folders are what they are.
    hub = {"revision": revision} if isinstance(source, str) and revision else {}
    processor = AutoProcessor.from_pretrained(source, **hub)
    model = Florence2ForConditionalGeneration.from_pretrained(
        source, dtype=getattr(torch, TORCH_DTYPES[dtype]), **hub
    )
    model = model.to(device).eval()
    return Florence(model, processor, device, dtype, task, num_beams, max_new_tokens)


def in_batches(
    items: Sequence[T],
    batch_size: int,
    run: Callable[[Sequence[T]], list[R]],
    on_halve: Callable[[int, int, BaseException], None],
    device: str = "cpu",
) -> Iterator[tuple[int, list[R]]]:
    """Yield (start index, run(batch)) batch by batch; on out-of-memory halve the batch and go on.

    The smaller size is kept for the rest of the run (the batch that failed will fail
    again). At one image per batch an out-of-memory error is re-raised as CaptionOutOfMemory.
    """
    start, size = 0, max(1, batch_size)
    while start < len(items):
        batch = items[start:start + size]
        out_of_memory = False
        try:
            results = run(batch)
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(error):
                raise
            if size == 1:
                raise CaptionOutOfMemory(
                    "captioning ran out of memory on a single image (caption.batch_size was already halved "
                    "down to 1): use caption.dtype bf16 or fp16, fewer caption.num_beams, a smaller "
                    "caption.max_new_tokens or a smaller caption.model, or caption.device cpu"
                ) from error
            on_halve(size, size // 2, error)
            size //= 2
            out_of_memory = True
        if out_of_memory:
            # Outside the handler, so the traceback and the tensors its frames hold are gone.
            free_memory(device)
            continue
        yield start, results
        start += len(batch)
