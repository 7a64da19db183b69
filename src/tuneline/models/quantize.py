"""`model.quantize`: the frozen base held in 8 or 4 bits, and the exact bytes that takes.

The one place that knows the levels. Each level replaces a frozen `nn.Linear` by a layer of the
same shape whose weight is stored quantized; biases, norms, convolutions and embeddings stay in
the frozen dtype, and so do the layers a family keeps in full precision (`Family.full_precision`).

- int8: torchao's `Int8Tensor` (what `Int8WeightOnlyConfig` makes): symmetric int8 per output row,
  an fp32 scale and an int8 zero point per row.
- fp8: torchao's `Float8Tensor` (what `Float8WeightOnlyConfig` makes): float8_e4m3fn per output
  row, an fp32 scale per row. The row maximum is floored at 1e-12 (as torchao's float8 training
  does), else an all-zero row divides 0 by a zero scale and the layer returns NaN.
- nf4: bitsandbytes 4-bit NormalFloat with double quantization, as QLoRA: blocks of 64 values,
  their absmax quantized again to uint8 in blocks of 256.

Both torchao levels compute the product in the frozen dtype from the dequantized weight; the
layer's autograd function keeps only the quantized weight for backward and dequantizes again
there (torchao's own linear would save a full-precision copy of every weight for backward, more
than the unquantized layer costs). bitsandbytes' matmul_4bit does the same already. PEFT wraps
both natively (TorchaoLoraLinear, its bnb Linear4bit), so LoRA trains on top; the trainer keeps
the LoRA parameters in fp32 (`keep_trained_fp32`).

Quantization is deterministic (exact resume rebuilds the same bytes) and runs on the meta device,
where `quantized_tensor_bytes` gives the bytes the memory estimate counts: the exact formula of
what each level stores, checked tensor for tensor against real layers (tests/test_quantize.py).
Importing this module is instant: torch, torchao and bitsandbytes load inside the functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from tuneline.core.params import ParamsError
from tuneline.models.config import QUANTIZE_LEVELS

if TYPE_CHECKING:
    from tuneline.train.config import TrainConfig

LIBRARY = {"int8": "torchao", "fp8": "torchao", "nf4": "bitsandbytes"}  # every level but none
NF4_BLOCK = 64  # values per absmax (QLoRA's block size)
NESTED_BLOCK = 256  # absmax values per second-level scale (bitsandbytes' double quantization)
NF4_CODE = 16  # entries of the NF4 code book (fp32), one copy per layer
NESTED_CODE = 256  # entries of the 8-bit dynamic code book of the nested absmax (fp32), one copy per layer
FP8_AMAX_FLOOR = 1e-12  # torchao.float8's EPS: the smallest row maximum a scale is computed from


class QuantizedLayer:
    """What every quantized layer is (checked with isinstance, torch-free): its level."""

    level: str = "none"


def quantized_tensor_bytes(level: str, out_features: int, in_features: int) -> dict[str, int]:
    """Bytes of each tensor `level` stores for one [out_features, in_features] weight, from the
    shape alone (works for the meta device). The names are those of `stored_tensors`.

    int8: qdata out*in (int8) + scale out*4 (fp32) + zero_point out (int8)
    fp8:  qdata out*in (float8_e4m3fn) + scale out*4 (fp32)
    nf4:  n = out*in, blocks = ceil(n / 64): data ceil(n / 2) (two 4-bit values per uint8)
          + absmax blocks (uint8, double-quantized) + code 16*4 + offset 4 (a 0-dim fp32)
          + nested_absmax ceil(blocks / 256)*4 (fp32) + nested_code 256*4
    """
    n = out_features * in_features
    if level == "int8":
        return {"qdata": n, "scale": 4 * out_features, "zero_point": out_features}
    if level == "fp8":
        return {"qdata": n, "scale": 4 * out_features}
    if level == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        return {"data": math.ceil(n / 2), "absmax": blocks, "code": 4 * NF4_CODE, "offset": 4,
                "nested_absmax": 4 * math.ceil(blocks / NESTED_BLOCK), "nested_code": 4 * NESTED_CODE}
    raise ValueError(f"no quantized layout for level {level!r}; allowed: {', '.join(LIBRARY)}")


def layer_bytes(layer: Any) -> int:
    """Bytes of a quantized layer's weight (`QuantizedLayer`), by the formula."""
    return sum(quantized_tensor_bytes(layer.level, layer.out_features, layer.in_features).values())


def stored_tensors(layer: Any) -> dict[str, Any]:
    """The real tensors a quantized layer holds for its weight, by the names of `quantized_tensor_bytes`."""
    weight = layer.weight
    if layer.level == "nf4":
        state = weight.quant_state
        return {"data": weight.data, "absmax": state.absmax, "code": state.code, "offset": state.offset,
                "nested_absmax": state.state2.absmax, "nested_code": state.state2.code}
    names, _ = weight.__tensor_flatten__()
    return {name: getattr(weight, name) for name in names}


# --- which layers ------------------------------------------------------------------------------


def kept(name: str, patterns: Sequence[str]) -> bool:
    """Whether the module `name` (dotted, as named_modules gives it) is one a family keeps in full
    precision: a pattern matches a whole dotted part or run of parts (`t_embedder`, `all_final_layer`)."""
    return any(re.search(rf"(^|\.){re.escape(pattern)}(\.|$)", name) for pattern in patterns)


def frozen_linear_layers(module: Any, keep: Sequence[str] = ()) -> Iterator[tuple[str, Any, str, Any]]:
    """(name, layer, attribute, parent) of every plain frozen nn.Linear of `module` that quantization
    takes: trained layers (LoRA's, a fully trained module's) and the `keep` patterns' are left."""
    import torch

    for parent_name, parent in list(module.named_modules()):
        for attribute, layer in list(parent.named_children()):
            name = f"{parent_name}.{attribute}" if parent_name else attribute
            if (type(layer) is torch.nn.Linear and not layer.weight.requires_grad
                    and layer.weight.is_floating_point() and not kept(_without_wrappers(name), keep)):
                yield name, layer, attribute, parent


def _without_wrappers(name: str) -> str:
    """A module name without PEFT's `.base_layer` (so patterns read the model's own names)."""
    return name.replace(".base_layer", "")


# --- the layers --------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _layer_class(level: str) -> type:
    """The quantized layer class of `level`, made on first use (torch and its library load here)."""
    import torch
    import torch.nn.functional as F

    if level == "nf4":
        import bitsandbytes as bnb

        class NF4Linear(QuantizedLayer, bnb.nn.Linear4bit):
            """bitsandbytes' Linear4bit (NF4, double quantization) that never repacks itself: on a CPU
            with AVX512-BF16, Linear4bit rewrites its weight at the first no-grad forward into a
            packed layout whose matmul has no backward and whose absmax is rounded to bf16."""

            level = "nf4"

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.support_avx512bf16_for_cpu = False

            def forward(self, x: Any) -> Any:
                # In (and out in) the frozen dtype, as autocast runs a plain Linear (see TorchaoLinear).
                return super().forward(x.to(self.compute_dtype))

        return NF4Linear

    class FrozenQuantizedLinear(torch.autograd.Function):
        """y = x W^T + b with W quantized and frozen: backward needs W only, so it holds the
        quantized W (a reference, not a saved tensor) and dequantizes it again."""

        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any) -> Any:
            ctx.weight = weight
            return F.linear(x, weight, bias)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return grad.matmul(ctx.weight.dequantize().to(grad.dtype)), None, None

    class TorchaoLinear(QuantizedLayer, torch.nn.Linear):
        """nn.Linear whose weight is a torchao Int8Tensor / Float8Tensor. It computes in the frozen
        dtype (the weight's), which is autocast's under mixed precision: as autocast runs a plain
        Linear. The quantized weight's own linear would compute and return in its input's dtype,
        fp32 after a norm: twice the activation bytes of the layer it replaces."""

        def forward(self, x: Any) -> Any:
            return FrozenQuantizedLinear.apply(x.to(self.weight.dtype), self.weight, self.bias)

    class Int8Linear(TorchaoLinear):
        level = "int8"

    class Fp8Linear(TorchaoLinear):
        level = "fp8"

    return {"int8": Int8Linear, "fp8": Fp8Linear}[level]


@contextmanager
def _bnb_code_map_kept_off_meta() -> Iterator[None]:
    """bitsandbytes caches its 8-bit code map (for the statistics of compressed nf4) in a module
    global, on the device of the first tensor it quantizes, and later moves it with `.to(device)`.
    Created by a memory estimate on the meta device, it has no data, and every real nf4
    quantization after it in the process fails ("Cannot copy out of meta tensor"). So a map left on
    the meta device is dropped, before and after."""
    from bitsandbytes import functional

    def drop_meta_map() -> None:
        cached = functional.name2qmap.get("dynamic")
        if cached is not None and cached.is_meta:
            del functional.name2qmap["dynamic"]

    drop_meta_map()
    try:
        yield
    finally:
        drop_meta_map()


def _quantized_layer(level: str, layer: Any, device: Any = None) -> Any:
    """The quantized replacement of the frozen nn.Linear `layer` (its weight in its dtype), on `device`
    (None: the weight's)."""
    import torch

    cls = _layer_class(level)
    weight = layer.weight.detach()
    if device is not None:
        weight = weight.to(device)
    if level == "nf4":
        import bitsandbytes as bnb

        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, compute_dtype=weight.dtype,
                  compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
        with _bnb_code_map_kept_off_meta():
            data, state = bnb.functional.quantize_4bit(weight, blocksize=NF4_BLOCK, compress_statistics=True,
                                                       quant_type="nf4", quant_storage=torch.uint8)
        new.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=NF4_BLOCK,
                                       compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                       module=new, bnb_quantized=True)
    else:
        from torchao.quantization import Float8Tensor, Int8Tensor
        from torchao.quantization.granularity import PerRow

        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        tensor = (Int8Tensor.from_hp(weight, granularity=PerRow()) if level == "int8" else
                  Float8Tensor.from_hp(weight, float8_dtype=torch.float8_e4m3fn, granularity=PerRow(),
                                       hp_value_lb=FP8_AMAX_FLOOR))
        new.weight = torch.nn.Parameter(tensor, requires_grad=False)
    if layer.bias is not None:
        new.bias = layer.bias if device is None else torch.nn.Parameter(layer.bias.detach().to(device),
                                                                         requires_grad=False)
    new.train(layer.training)
    return new


def quantize_frozen(module: Any, level: str, dtype: Any = None, keep: Sequence[str] = (), device: Any = None) -> int:
    """Quantize the frozen nn.Linear layers of `module` in place (those `frozen_linear_layers` gives)
    at `level`; return how many. 'none' changes nothing. With `dtype`, every frozen floating tensor
    of `module` is cast to it first, so the weights are quantized from (and compute in) the dtype
    the unquantized base would have been held in. With `device`, each layer is quantized there, one
    at a time, and stays there (the rest of `module` does not move): a GPU quantizes a 6B transformer
    in seconds where the CPU takes minutes (nf4 most). Works on the meta device (the memory estimate)."""
    if level == "none":
        return 0
    if level not in LIBRARY:
        raise ParamsError(f"model.quantize: {level!r} is not a level; allowed: {', '.join(QUANTIZE_LEVELS)}")
    if dtype is not None:
        from tuneline.core.device import cast_frozen

        cast_frozen(module, dtype)
    from tuneline.core.logs import quiet_libraries

    quiet_libraries()
    import torch

    count = 0
    with torch.no_grad():
        for _, layer, attribute, parent in list(frozen_linear_layers(module, keep)):
            setattr(parent, attribute, _quantized_layer(level, layer, device))
            count += 1
    if level == "nf4":
        # What transformers and diffusers set on a model loaded in 4 bits: PEFT then wraps its
        # Linear4bit layers in its own 4-bit LoRA layer (its plain one otherwise).
        module.is_loaded_in_4bit = True
    return count


def quantize_pipeline(pipeline: Any, level: str, full_precision: dict[str, tuple[str, ...]],
                      device: Any = None) -> None:
    """Quantize a diffusers pipeline for inference: its denoiser and text encoders (every torch module
    component but the VAE, which is mostly convolutions and makes the pixels), each frozen first, its
    family's full-precision layers kept (`full_precision`: component -> names), quantized on `device`
    (see quantize_frozen). 'none' changes nothing."""
    if level == "none":
        return
    import torch

    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module) and name != "vae":
            component.requires_grad_(False)
            quantize_frozen(component, level, keep=full_precision.get(name, ()), device=device)


def keep_trained_fp32(module: Any) -> None:
    """Trained parameters of `module` back to fp32: PEFT gives a LoRA the dtype its base layer
    computes in (bf16 on a quantized base under bf16 mixed precision)."""
    import torch

    for parameter in module.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def quantized_layers(modules: Iterable[Any]) -> Iterator[Any]:
    """Every quantized layer under `modules`, each once."""
    seen: set[int] = set()
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, QuantizedLayer) and id(sub) not in seen:
                seen.add(id(sub))
                yield sub


# --- what refuses it ---------------------------------------------------------------------------

def full_training_problems(level: str, train: TrainConfig) -> list[str]:
    """One line per module `train` trains fully while model.quantize is set: a quantized weight is
    frozen, it cannot be trained (only a LoRA on top of it). A family's own rules refuse the text
    encoder settings it has no use for."""
    if level == "none":
        return []
    # params key -> (its mode, what it allows besides 'full')
    modes = {"train.mode": (train.mode, "'lora'"),
             "train.text_encoder_1.mode": (train.text_encoder_1.mode, "'lora' or 'frozen'"),
             "train.text_encoder_2.mode": (train.text_encoder_2.mode, "'lora' or 'frozen'")}
    return [f"{key}: 'full' cannot train a quantized base (model.quantize: {level!r} stores the frozen weights in "
            f"{level}, and a quantized weight is not trainable); allowed with it: {others}; or set "
            "model.quantize: 'none' to fine-tune fully" for key, (mode, others) in modes.items() if mode == "full"]


def refuse_full_training(level: str, train: TrainConfig) -> None:
    """ParamsError naming every fully trained module when model.quantize is set (also checked by
    tuneline.preflight before any stage computes)."""
    problems = full_training_problems(level, train)
    if problems:
        raise ParamsError("settings that cannot run together:\n" + "\n".join(f"  - {p}" for p in problems))


def cache_key_fields(level: str) -> dict[str, str]:
    """What a quantized encoder or denoiser adds to a cache key: nothing at 'none' (keys made before
    the setting existed stay valid), else the level."""
    return {} if level == "none" else {"quantize": level}
