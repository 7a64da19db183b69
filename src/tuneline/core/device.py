"""Devices and dtypes by their config names ("auto", "cpu", "cuda"; "fp32", "bf16", "fp16"), shared by
every stage and model family. torch is imported inside the functions: importing this is instant."""

from __future__ import annotations

from typing import Any

from tuneline.core.params import ParamsError

# Config names -> torch dtype attribute names.
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# A mixed_precision setting -> the dtype autocast computes in (config name); "no" computes in fp32.
COMPUTE_DTYPES = {"bf16": "bf16", "fp16": "fp16"}


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is a configuration error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"device is {device!r} but torch sees no CUDA GPU; allowed: auto, cpu, cuda")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU, where half precision is slow."""
    import torch

    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def compute_dtype_name(mixed_precision: str) -> str:
    """The dtype autocast computes in: frozen weights are stored in it ('fp32' without mixed precision)."""
    return COMPUTE_DTYPES.get(mixed_precision, "fp32")


def cast_frozen(module: Any, dtype: Any) -> None:
    """Cast the frozen floating parameters and buffers of `module` to `dtype`, in place; trained
    parameters (requires_grad) keep theirs. Autocast casts fp32 weights to the compute dtype at every
    use anyway, so an fp32 copy of a frozen weight only costs memory (SDXL's UNet: 10.3 GB vs 5.1)."""
    import torch

    with torch.no_grad():
        for sub in module.modules():
            for parameter in sub._parameters.values():
                if parameter is not None and not parameter.requires_grad and parameter.is_floating_point():
                    parameter.data = parameter.data.to(dtype)
            for key, buffer in sub._buffers.items():
                if buffer is not None and buffer.is_floating_point():
                    sub._buffers[key] = buffer.to(dtype)
