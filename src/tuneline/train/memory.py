"""How much GPU memory a training run will take, before it starts (`tuneline check` prints it).

The model is built from its configs on the meta device (shapes and dtypes, nothing read or
allocated) and set up exactly as the trainer sets it up (adapter.load + setup_training:
frozen weights in the compute dtype, LoRA adapters in fp32, gradient checkpointing). Then:

- **weights**: every frozen parameter and buffer of the modules a step uses, summed per dtype
  (the text encoders only when the step runs them; with cached embeddings they are not loaded);
  with model.quantize, the quantized linear weights per level ("int8", "fp8", "nf4") by the exact
  formula of what the level stores (tuneline.models.quantize.quantized_tensor_bytes);
- **trained parameters** and their **gradients** (same dtype, fp32);
- **optimizer state**, per optimizer from the shapes (`optimizer_state_bytes`): AdamW two
  moments + a 4-byte step per tensor, Lion one moment, Adafactor factored second moments,
  Prodigy moments + s + p0, 8-bit AdamW uint8 moments with fp32 block scales;
- **EMA** shadow (fp32 copy of the trained parameters) when on and not on the CPU;
- **activations** at the bucket the caller names (for a run: its largest, pixels x batch size;
  tuneline.stages.train.memory picks it from the bucket settings): one forward of the real loss
  on meta tensors of that shape, counting every tensor autograd saves for backward (each
  storage once, parameters excluded) through `torch.autograd.graph.saved_tensors_hooks`.
  Mixed precision is emulated with the dtype rules of CUDA autocast (matmuls and
  convolutions in the compute dtype, normalisations and losses in fp32); with gradient
  checkpointing, a checkpointed block holds its inputs and its own saves are counted once,
  for the largest block (recomputed one at a time in backward). Then
      activations = saved + largest checkpointed block + 2 x largest saved tensor
  (the last term: gradients in flight at the start of backward).

peak = weights + trained + gradients + optimizer + EMA + activations. CUDA's own context,
cuBLAS/cuDNN workspaces and allocator fragmentation are outside it (`torch.cuda.max_memory_allocated`
does not count the first two either). Weight, trained and optimizer bytes are exact (a test
compares them with the real tensors); the activation term is an estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuneline.models.config import ModelConfig
from tuneline.train.adapter import DiffusionAdapter
from tuneline.train.config import TrainConfig

GIB = 1024**3
# bitsandbytes 0.50.2 Optimizer2State: tensors smaller than this keep fp32 state; 8-bit state is
# quantised in blocks of 256 values, each with an fp32 scale; two shared 256-entry fp32 code books.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
OPTIMIZERS = ("adamw", "adamw8bit", "lion", "adafactor", "prodigy")


@dataclass
class MemoryEstimate:
    weights: dict[str, int]  # frozen weights (and buffers) on the device: dtype name -> bytes
    trained: int  # trained parameters
    gradients: int
    optimizer: int
    optimizer_name: str
    ema: int
    activations: int
    activation_case: str  # "1024x1024, batch 4": the bucket the activations were estimated at
    trained_dtypes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    detail: dict[str, int] = field(default_factory=dict)  # parts of the activation term
    optimizers: dict[str, int] = field(default_factory=dict)  # the state every optimizer would keep

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def peak(self) -> int:
        return self.weights_total + self.trained + self.gradients + self.optimizer + self.ema + self.activations

    def rows(self) -> list[tuple[str, int]]:
        rows = [(f"frozen weights, {dtype}", size) for dtype, size in sorted(self.weights.items())]
        rows.append((f"trained parameters, {'/'.join(self.trained_dtypes) or '-'}", self.trained))
        rows.append(("gradients", self.gradients))
        rows.append((f"optimizer state ({self.optimizer_name})", self.optimizer))
        if self.ema:
            rows.append(("EMA of the trained weights", self.ema))
        rows.append((f"activations at {self.activation_case} (estimated)", self.activations))
        rows.append(("peak (estimated)", self.peak))
        return rows

    def sharded(self, processes: int) -> MemoryEstimate:
        """The figure per process under FSDP over `processes` (configs/accelerate/fsdp2.yaml): the trained
        parameters, their gradients, the optimizer state and the EMA are split evenly (rounded up); frozen
        weights (text encoders, a frozen base under LoRA, counted whole) and activations stay per process.
        One block's gathered parameters in flight are not counted."""
        if processes < 1:
            raise ValueError(f"processes is {processes}: at least 1")

        def share(size: int) -> int:
            return -(-size // processes)

        return replace(self, trained=share(self.trained), gradients=share(self.gradients),
                       optimizer=share(self.optimizer), ema=share(self.ema),
                       notes=[*self.notes, f"FSDP over {processes} processes: trained parameters, gradients, "
                                           f"optimizer state and EMA are 1/{processes} each"]
                       if processes > 1 else self.notes)

    def to_json(self) -> dict[str, Any]:
        return {"weights": self.weights, "trained": self.trained, "gradients": self.gradients,
                "optimizer": self.optimizer, "optimizer_name": self.optimizer_name, "ema": self.ema,
                "activations": self.activations, "activation_case": self.activation_case, "peak": self.peak,
                "detail": self.detail, "optimizers": self.optimizers, "notes": self.notes}


def dtype_name(dtype: Any) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
            torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8", torch.bool: "bool"}.get(
        dtype, str(dtype).removeprefix("torch."))


def tensor_bytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


def weight_bytes(modules: list[Any]) -> tuple[dict[str, int], int, list[str]]:
    """(frozen parameter + buffer bytes per dtype, trained parameter bytes, trained dtypes) of `modules`,
    each tensor once (tied weights are one tensor). A quantized layer's weight counts under its level
    with every tensor the level stores for it (its bias under the bias's dtype)."""
    from tuneline.models.quantize import layer_bytes, quantized_layers

    frozen: dict[str, int] = {}
    trained = 0
    trained_dtypes: set[str] = set()
    seen: set[int] = set()
    for layer in quantized_layers(modules):
        frozen[layer.level] = frozen.get(layer.level, 0) + layer_bytes(layer)
        seen.add(id(layer.weight))
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if getattr(tensor, "requires_grad", False):
                trained += tensor_bytes(tensor)
                trained_dtypes.add(dtype_name(tensor.dtype))
            else:
                name = dtype_name(tensor.dtype)
                frozen[name] = frozen.get(name, 0) + tensor_bytes(tensor)
    return frozen, trained, sorted(trained_dtypes)


def optimizer_state_bytes(name: str, parameters: list[Any], beta1: float = 0.9) -> int:
    """Bytes of the state `name` (train.optimizer.name) keeps for `parameters` after its first step.

    Exact for the optimizers as built by tuneline.train.optim (tested against their real state on
    the CPU); adamw8bit follows bitsandbytes 0.50.2's layout (it needs CUDA to check). Prodigy's p0
    is a 0-dim tensor for an all-zero parameter (LoRA up weights at the start); on meta tensors,
    whose values are unknown, a full copy is counted.
    """
    total = 0
    for p in parameters:
        n, size = p.numel(), p.element_size()
        if name == "adamw":
            total += 2 * n * size + 4  # exp_avg, exp_avg_sq, step (fp32 scalar tensor)
        elif name == "lion":
            total += n * size  # exp_avg
        elif name == "adafactor":
            grad_size = max(size, 4)  # half-precision gradients are upcast to fp32 first
            shape = tuple(p.shape)
            if len(shape) >= 2:
                total += (math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:])) * grad_size
            else:
                total += n * grad_size
            total += size  # RMS: a 0-dim tensor in the parameter's dtype
        elif name == "prodigy":
            total += n * size  # s
            zero = p.device.type != "meta" and not bool(p.detach().any())
            total += size if zero else n * size  # p0
            total += (2 if beta1 > 0 else 1) * n * size  # exp_avg, exp_avg_sq
        elif name == "adamw8bit":
            if n < BNB_MIN_8BIT_SIZE:
                total += 2 * n * 4
            else:
                blocks = -(-n // BNB_BLOCK)
                total += 2 * n + 2 * blocks * 4
        else:
            raise ValueError(f"no memory formula for optimizer {name!r}")
    if name == "adamw8bit" and any(p.numel() >= BNB_MIN_8BIT_SIZE for p in parameters):
        total += 2 * 256 * 4  # the two code books, shared by every tensor
    return total


def real_optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in `optimizer.state`, each storage once: what optimizer_state_bytes predicts."""
    import torch

    seen: set[Any] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = (value.device, value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
                if value.untyped_storage().data_ptr() == 0 or key not in seen:
                    seen.add(key)
                    total += tensor_bytes(value)
    return total


# --- activations ----------------------------------------------------------------------------


def _meta_rules(dtype: Any) -> Any:
    """A TorchFunctionMode that makes a meta-device forward save what a CUDA one saves.

    - Mixed precision (`dtype` not None): CUDA autocast's dtype rules, which autocast itself does not
      apply to meta tensors: the ops autocast runs in low precision get low-precision inputs, the
      ops it runs in fp32 get fp32 inputs; everything else runs in its inputs' dtype, as under autocast.
    - Attention: on CUDA, scaled_dot_product_attention runs a flash / memory-efficient kernel that
      saves q, k, v, the output and a per-row logsumexp, never the L x L weights (the meta device
      would pick the math path, which saves them).
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    low = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.mm, torch.bmm,
           torch.baddbmm, torch.addmm, torch.einsum, F.scaled_dot_product_attention, torch.Tensor.matmul,
           torch.Tensor.__matmul__, torch.Tensor.bmm, torch.Tensor.mm}
    fp32 = {F.group_norm, F.layer_norm, F.mse_loss, torch.exp, torch.log, torch.pow, torch.Tensor.pow,
            torch.rsqrt, torch.softmax, F.softmax, torch.Tensor.softmax, F.softplus, torch.cdist,
            torch.logsumexp, F.log_softmax, torch.cumsum}

    class FlashAttentionOnMeta(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, query: Any, key: Any, value: Any) -> Any:
            output = query.new_empty((*query.shape[:-1], value.shape[-1]))
            logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(query, key, value, output, logsumexp)
            return output

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # never called: the estimate runs no backward
            raise NotImplementedError

    def cast(value: Any, to: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != to:
            return value.to(to)
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v, to) for v in value)
        return value

    class MetaRules(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            target = None
            if dtype is not None:
                target = dtype if func in low else (torch.float32 if func in fp32 else None)
            if target is not None:
                args, kwargs = cast(args, target), {k: cast(v, target) for k, v in kwargs.items()}
            if func is F.scaled_dot_product_attention:
                # Positional (the UNet's processors) or by name (diffusers' attention dispatch: Z-Image).
                qkv = [*args[:3], *(kwargs[name] for name in ("query", "key", "value")[len(args[:3]):])]
                return FlashAttentionOnMeta.apply(*qkv)
            return func(*args, **kwargs)

    return MetaRules()


class _SavedCounter:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.storages: dict[int, int] = {}
        self.largest = 0
        # Held until the count is done: a freed storage's address could name a later one (meta: no memory).
        self.held: list[Any] = []

    def key(self, tensor: Any) -> int:
        return tensor.untyped_storage()._cdata

    def add(self, tensor: Any) -> None:
        key = self.key(tensor)
        if key in self.excluded or key in self.storages:
            return
        size = tensor.untyped_storage().nbytes()
        self.storages[key] = size
        self.held.append(tensor)
        self.largest = max(self.largest, size)

    def hooks(self) -> Any:
        import torch

        def pack(tensor: Any) -> Any:
            self.add(tensor)
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def activation_bytes(adapter: DiffusionAdapter, modules: dict[str, Any], batch: dict[str, Any], mixed_precision: str) -> dict[str, int]:
    """Estimated activation memory of one training micro-batch: {"saved", "checkpointed_block",
    "gradients_in_flight", "total"} in bytes. `modules` and `batch` are on the meta device."""
    import torch

    from tuneline.core.device import compute_dtype_name, torch_dtype

    every = [m for module in modules.values() for m in module.modules()]
    excluded = {t.untyped_storage()._cdata for m in every for t in [*m.parameters(recurse=False),
                                                                   *m.buffers(recurse=False)]}
    outer = _SavedCounter(excluded)
    block_peak = [0, 0]  # largest checkpointed block's saves, largest tensor seen inside blocks

    def counting_checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
        for value in [*args, *kwargs.values()]:  # a checkpoint keeps its inputs for the recomputation
            if isinstance(value, torch.Tensor) and value.requires_grad:
                outer.add(value)
        inner = _SavedCounter(excluded)
        with inner.hooks():
            result = function(*args, **kwargs)
        block_peak[0] = max(block_peak[0], inner.total)
        block_peak[1] = max(block_peak[1], inner.largest)
        return result

    # Every module that checkpoints (diffusers' and transformers' blocks) calls _gradient_checkpointing_func.
    for module in every:
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = counting_checkpoint
    dtype = compute_dtype_name(mixed_precision)
    for module in modules.values():
        module.train()
    with outer.hooks(), _meta_rules(torch_dtype(dtype) if dtype != "fp32" else None):
        loss, _ = adapter.loss(modules, batch, None, 0)
    del loss
    largest = max(outer.largest, block_peak[1])
    parts = {"saved": outer.total, "checkpointed_block": block_peak[0], "gradients_in_flight": 2 * largest}
    parts["total"] = sum(parts.values())
    return parts


# --- the estimate of a run -------------------------------------------------------------------


def estimate(model: ModelConfig, train: TrainConfig, root: Path, bucket: tuple[int, int], batch_size: int, *,
             text_cached: bool, live_samples: bool = False, adapter: DiffusionAdapter | None = None,
             fsdp_processes: int = 1) -> MemoryEstimate:
    """The GPU memory of training `model` (the adapter of model.base's family) with `train`, from the
    model's configs alone, its activations at `bucket` (width, height) x `batch_size`.

    The caller says what only the pipeline knows: the bucket (the largest one the data sets make),
    whether the latents stage caches the text embeddings this training can use (`text_cached`: then
    no text encoder is loaded), and whether live samples render during training. `adapter` (already
    loaded and set up, e.g. on real weights) skips building one on the meta device. `fsdp_processes` > 1:
    the figure per process of FSDP over that many (MemoryEstimate.sharded).
    """
    import torch

    from tuneline.models.family import detect_family
    from tuneline.models.registry import build_adapter

    if adapter is None:
        adapter = build_adapter(detect_family(model, root), model, train, root)
        with torch.random.fork_rng(devices=[]):  # LoRA initialisation draws: leave the caller's RNG alone
            adapter.load(conditioning_cached=text_cached, empty_weights=True)
            adapter.setup_training()
    modules = adapter.trained_modules()
    on_device = [*modules.values(), *adapter.frozen_modules().values()]
    frozen, trained, trained_dtypes = weight_bytes(on_device)
    parameters = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    optimizers = {name: optimizer_state_bytes(name, parameters, train.optimizer.betas[0]) for name in OPTIMIZERS}
    optimizer = optimizers[train.optimizer.name]
    ema = sum(p.numel() * 4 for p in parameters) if train.ema.enabled and not train.ema.on_cpu else 0
    notes = []
    batch = adapter.example_batch(batch_size, bucket, "meta", with_text=text_cached)
    detail = activation_bytes(adapter, modules, batch, train.mixed_precision)
    if not text_cached:
        notes.append("the text encoders run every step (text embeddings not cached): their weights are counted")
    smallest = min(optimizers, key=optimizers.get)
    if optimizers[smallest] < optimizer and optimizer - optimizers[smallest] > 0.05 * GIB:
        notes.append(f"train.optimizer.name {smallest} would keep {format_bytes(optimizers[smallest])} of state "
                     f"instead of {format_bytes(optimizer)}")
    if live_samples:
        notes.append("live samples load the VAE and (if not loaded) the text encoders onto the GPU while rendering")
    whole = MemoryEstimate(
        weights=frozen, trained=trained, gradients=trained, optimizer=optimizer, optimizer_name=train.optimizer.name,
        ema=ema, activations=detail["total"], activation_case=f"{bucket[0]}x{bucket[1]}, batch {batch_size}",
        trained_dtypes=trained_dtypes, notes=notes, detail=detail, optimizers=optimizers)
    return whole.sharded(fsdp_processes) if fsdp_processes > 1 else whole


def format_bytes(size: int) -> str:
    if size >= GIB:
        return f"{size / GIB:.2f} GiB"
    if size >= 1024**2:
        return f"{size / 1024**2:.1f} MiB"
    return f"{size / 1024:.1f} KiB"
