"""`tuneline check --fit <GiB>`: the cheapest setting changes that bring the training's estimated GPU
memory (tuneline.stages.train.memory) under a card's size, as `-S key=value` overrides that
`dvc exp run`, `python -m flows.pipeline` and `tuneline check` take.

A card of N GiB fits when the estimated peak is at most 90% of it (`fits_card`): the other 10% is
CUDA's context, cuBLAS/cuDNN workspaces and allocator fragmentation, which the estimate leaves out
(the same rule as the card line of `tuneline check`).

The search is greedy. Knobs are tried in a fixed order, cheapest first; a knob proposes one change
at a time (one level lower), each change is estimated once, kept when it lowers the peak (a knob
whose change saves nothing is passed over: e.g. a data set with its own bucket resolution), and the
search stops at the first prefix of changes that fits. Knobs already at their cheapest are skipped.
Each estimate builds the model from its configs on the meta device (about a second on the
published Z-Image-Turbo shape); the optimizer change needs none, since every estimate prices the
state of every optimizer already.

The order, from what each change costs and what the anchor trainers tell owners of small cards:

1. `train.mixed_precision: bf16` (from fp32): faster, not slower; trained weights, gradients and
   optimizer state stay fp32. Every anchor trains Z-Image and SDXL LoRAs in bf16 (SimpleTuner
   ZIMAGE.md: "bf16 on modern GPUs; fp16 otherwise"; ai-toolkit, OneTrainer presets: bf16).
2. `latents.text_embeddings: true`: the latents stage caches the caption embeddings, so no text
   encoder sits on the GPU (Z-Image's Qwen3-4B: 7.5 GiB in bf16). Free; offered only when caption
   dropout, shuffling or a trained text encoder do not rule the cache out.
3. `train.ema.on_cpu: true`: the EMA copy lives in host memory; costs a copy per EMA update.
4. `train.gradient_checkpointing: true`: same result, roughly 20-30% slower steps. SimpleTuner: "set
   this to true in practically every situation on every device"; ai-toolkit's configs: "need this
   on unless you have a ton of vram".
5. An 8-bit optimizer, `train.optimizer.name: adamw8bit` (ai-toolkit's default; SimpleTuner's
   lowest-VRAM recipe uses 8-bit Lion/AdamW): AdamW's update with its moments in 8 bits. It needs
   bitsandbytes and a CUDA GPU; `adafactor` (factored second moments) is the alternative elsewhere.
   For a LoRA the state is small, so this step rarely decides a fit, but it costs nothing.
6. `model.quantize`: `int8` (then `nf4`) stores the frozen denoiser in 8 (4) bits; the LoRA trains on
   top in full precision. SimpleTuner: "quantising the model to 8bit generally doesn't harm
   training", nf4 "reduces VRAM further but is more sensitive"; OneTrainer's 8 and 16 GB Z-Image
   presets train on an fp8 transformer. Before batch size: it keeps the step time, where batch 1
   with gradient accumulation makes each optimizer step longer ("increases runtime linearly").
7. Batch size halved down to 1 (`bucket.batch_size`, larger `bucket.batch_sizes` entries), with
   `train.gradient_accumulation` raised to keep the effective batch: the same updates, more time
   per update. ai-toolkit's and SimpleTuner's small-card recipes train at batch 1.
8. `bucket.resolution` 768, then 512, last: the model then learns at a lower resolution than it
   renders. SimpleTuner's lowest-VRAM Z-Image recipe and OneTrainer's 8 GB preset train at 512.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from tuneline.core.params import ParamsError
from tuneline.train.memory import GIB, MemoryEstimate, format_bytes

# The share of a card the estimated peak may take: the rest is CUDA's context, workspaces, fragmentation.
USABLE_FRACTION = 0.9
# The anchors' small-card resolutions (SimpleTuner's lowest-VRAM recipe and OneTrainer's 8 GB preset: 512).
RESOLUTION_STEPS = (768, 512)
# model.quantize, each level to the next cheaper one.
NEXT_QUANTIZE = {"none": "int8", "int8": "nf4", "fp8": "nf4"}
EIGHT_BIT_OR_FACTORED = ("adamw8bit", "adafactor")


def fits_card(peak: int, card_gib: float) -> bool:
    """Whether an estimated peak fits a card of `card_gib` GiB, leaving 10% for CUDA's context and fragmentation."""
    return peak <= card_gib * GIB * USABLE_FRACTION


def parse_card_size(text: str) -> float:
    """`--fit`'s value: a card size in GiB, a number above 0 (ValueError otherwise)."""
    try:
        size = float(text)
    except ValueError:
        size = math.nan
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"expected a card size in GiB above 0, like 12 or 7.5; got {text!r}")
    return size


def set_arg(key: str, value: Any) -> str:
    """`-S key=value` as a shell passes it on: the value read back as YAML is `value` again."""
    import shlex

    return f"-S {shlex.quote(f'{key}={format_value(value)}')}"


def format_value(value: Any) -> str:
    """A setting's value as YAML text that reads back as `value` (what `-S` parses)."""
    import yaml

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return text if yaml.safe_load(text) == text else json.dumps(text)


@dataclass(frozen=True)
class Change:
    """One step of a plan: the settings it changes (dotted key -> value), why it costs what it
    costs, and the estimated peak with it and every change before it."""

    settings: dict[str, Any]
    why: str
    peak: int

    def set_args(self) -> list[str]:
        return [set_arg(key, value) for key, value in self.settings.items()]


@dataclass
class FitPlan:
    card_gib: float
    start: int  # the estimated peak of the configured params
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    estimates: int = 0  # models built on the meta device by the search
    seconds: float = 0.0

    @property
    def budget(self) -> float:
        return self.card_gib * GIB * USABLE_FRACTION

    @property
    def peak(self) -> int:
        return self.changes[-1].peak if self.changes else self.start

    @property
    def fits(self) -> bool:
        return fits_card(self.peak, self.card_gib)

    def settings(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for change in self.changes:
            merged.update(change.settings)
        return merged

    def set_args(self) -> list[str]:
        return [set_arg(key, value) for key, value in self.settings().items()]


def with_settings(params: Any, settings: dict[str, Any]) -> Any:
    """`params` with dotted `settings` changed, validated again (ParamsError names a bad one)."""
    from tuneline.config import validate_params

    data = params.model_dump(mode="json")
    for dotted, value in settings.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate_params(data, "params with the --fit changes")


# --- the knobs, cheapest first: each proposes (settings, why) or None (at its cheapest) ---------

Proposal = Optional[tuple[dict[str, Any], str]]


def _mixed_precision(params: Any, estimate: MemoryEstimate) -> Proposal:
    if params.train.mixed_precision != "no":
        return None
    return ({"train.mixed_precision": "bf16"},
            "frozen weights and activations in bf16, trained weights stay fp32; faster. bf16 needs an Ampere or "
            "newer GPU (fp16 otherwise: the same bytes)")


def _text_cache(params: Any, estimate: MemoryEstimate) -> Proposal:
    from tuneline.train.cached_text import text_cache_blockers

    if params.latents.text_embeddings or text_cache_blockers(params.train):
        return None
    return ({"latents.text_embeddings": True},
            "the latents stage caches the caption embeddings: no text encoder on the GPU while training")


def _ema_on_cpu(params: Any, estimate: MemoryEstimate) -> Proposal:
    ema = params.train.ema
    if not ema.enabled or ema.on_cpu:
        return None
    return {"train.ema.on_cpu": True}, "the EMA copy of the trained weights stays in host memory"


def _gradient_checkpointing(params: Any, estimate: MemoryEstimate) -> Proposal:
    if params.train.gradient_checkpointing:
        return None
    return ({"train.gradient_checkpointing": True},
            "blocks recompute their activations in backward: the same result, about 20-30% slower steps")


def _optimizer(params: Any, estimate: MemoryEstimate) -> Proposal:
    current = params.train.optimizer.name
    if current in EIGHT_BIT_OR_FACTORED:
        return None
    why = (f"8-bit AdamW: needs bitsandbytes and a CUDA GPU; without them -S train.optimizer.name=adafactor "
           f"(factored: {format_bytes(estimate.optimizers['adafactor'])} of state instead of "
           f"{format_bytes(estimate.optimizers['adamw8bit'])})")
    if current == "prodigy":
        why += "; train.lr is Prodigy's multiplier: give AdamW a learning rate too (e.g. -S train.lr=1e-4)"
    return {"train.optimizer.name": "adamw8bit"}, why


def _quantize(params: Any, estimate: MemoryEstimate) -> Proposal:
    if params.train.mode != "lora":  # a full fine-tune trains the denoiser's own weights
        return None
    level = NEXT_QUANTIZE.get(params.model.quantize)
    if level is None:
        return None
    if level == "int8":
        why = ("the frozen denoiser (and any text encoder loaded) stored in int8, weight-only; the LoRA trains on "
               "top in fp32; fp8 takes the same bytes")
    else:
        why = ("the frozen denoiser stored in 4-bit NormalFloat (QLoRA's nf4, bitsandbytes): half of int8's bytes, "
               "more sensitive to quality")
    return {"model.quantize": level}, why


def _batch_size(params: Any, estimate: MemoryEstimate) -> Proposal:
    bucket = params.bucket
    largest = max([bucket.batch_size, *bucket.batch_sizes.values()])
    if largest <= 1:
        return None
    smaller = largest // 2 if largest % 2 == 0 else 1
    settings: dict[str, Any] = {}
    if bucket.batch_size > smaller:
        settings["bucket.batch_size"] = smaller
        settings["train.gradient_accumulation"] = (params.train.gradient_accumulation
                                                   * math.ceil(bucket.batch_size / smaller))
    for key, size in bucket.batch_sizes.items():
        if size > smaller:
            settings[f"bucket.batch_sizes.{key}"] = smaller
    kept = (f", gradient accumulation {settings['train.gradient_accumulation']} keeps the effective batch"
            if "train.gradient_accumulation" in settings else "")
    return settings, f"batch {smaller}{kept}: the same updates, more time per update"


def _resolution(params: Any, estimate: MemoryEstimate) -> Proposal:
    if params.bucket.resolutions:  # an explicit bucket list: bucket.resolution generates nothing
        return None
    lower = [side for side in RESOLUTION_STEPS if side < params.bucket.resolution]
    if not lower:
        return None
    return ({"bucket.resolution": lower[0]},
            f"buckets of about {lower[0]}x{lower[0]} pixels: the model learns below the resolution it renders at; "
            "the bucket, latents and train stages run again")


KNOBS: tuple[Callable[[Any, MemoryEstimate], Proposal], ...] = (
    _mixed_precision, _text_cache, _ema_on_cpu, _gradient_checkpointing, _optimizer, _quantize, _batch_size,
    _resolution)


def plan_fit(params: Any, root: Path, card_gib: float, start: MemoryEstimate | None = None,
             estimator: Callable[[Any, Path], MemoryEstimate] | None = None) -> FitPlan:
    """The shortest prefix of the knobs' changes (cheapest first) whose estimated peak fits a card of
    `card_gib` GiB; when none fits, every change that saved memory, and the smallest peak reached.
    `start`: the estimate of `params` when the caller has it (saves one model build). `estimator`:
    what prices a candidate (default estimate_training_memory; a caller that estimates the same
    params again, as the tests do, passes one that remembers)."""
    from tuneline.stages.train.memory import estimate_training_memory

    price = estimator or estimate_training_memory
    began = time.perf_counter()
    plan = FitPlan(card_gib=card_gib, start=0)
    if start is None:
        start = price(params, root)
        plan.estimates += 1
    plan.start = start.peak
    current, estimate = params, start
    for knob in KNOBS:
        while not fits_card(estimate.peak, card_gib):
            proposal = knob(current, estimate)
            if proposal is None:
                break
            settings, why = proposal
            shown = " ".join(Change(settings, why, 0).set_args())
            try:
                candidate = with_settings(current, settings)
            except ParamsError as error:  # a setting these params refuse: the next knob
                plan.notes.append(f"{shown}: refused ({str(error).strip().splitlines()[-1].strip()})")
                break
            if set(settings) == {"train.optimizer.name"}:  # every optimizer's state is priced already
                name = settings["train.optimizer.name"]
                changed = replace(estimate, optimizer=estimate.optimizers[name], optimizer_name=name)
            else:
                try:
                    changed = price(candidate, root)
                except Exception as error:  # noqa: BLE001 - one knob the estimate cannot price: try the next
                    plan.notes.append(f"{shown}: no estimate ({type(error).__name__}: {str(error).strip()[:160]})")
                    break
                finally:
                    plan.estimates += 1
            if changed.peak >= estimate.peak:
                plan.notes.append(f"{shown}: passed over, the estimate does not drop ({format_bytes(changed.peak)})")
                break
            plan.changes.append(Change(settings, why, changed.peak))
            current, estimate = candidate, changed
        if fits_card(estimate.peak, card_gib):
            break
    plan.seconds = time.perf_counter() - began
    return plan
