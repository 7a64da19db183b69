"""Full fine-tunes sharded with FSDP2 through accelerate (`accelerate launch --config_file configs/accelerate/fsdp2.yaml`).

accelerate reads the FSDP plugin from the launch config; the trainer only asks `sharded(accelerator)`. Under it:
- the wrap policy's block classes come from the family (`Family.shard_blocks`) unless the config names its own;
- the trained parameters, their gradients, the optimizer state and the EMA shadow are DTensors, each process
  holding 1/N of every one;
- a checkpoint keeps the single-process layout's files (state json, `trained.safetensors` gathered to full
  weights, `training.pt` with the schedules and the grad scaler, `rng_rank*.pt`) and adds the sharded state:
  `fsdp/` (accelerate's save_state: the model and optimizer as torch.distributed.checkpoint shards) and `ema/`
  (the EMA shadow, the same format);
- the final output (save_outputs) is written by the main process from plain copies of the trained modules
  (`plain_copy`: the module's own class built from its config, holding the gathered full weights), so the
  diffusers folders are the ones an unsharded run writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

SHARDED_LAYOUT = "fsdp2"  # the state json's `sharded` (absent: the single-process layout)
SHARDED_DIR = "fsdp"  # accelerate.save_state of the model and optimizer shards
EMA_SHARDED_DIR = "ema"  # the EMA shadow's shards (torch.distributed.checkpoint)


class FsdpRefused(ValueError):
    """A setting FSDP cannot shard, named with its value."""


def sharded(accelerator: Any) -> bool:
    """Whether accelerate runs this process under FSDP; refuses FSDP1 (tuneline shards with FSDP2 only)."""
    import os

    import accelerate
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            # accelerate picks FSDP only for GPU-like processes: with --cpu it runs DDP (or nothing) and says nothing.
            raise FsdpRefused(
                f"the accelerate launch config asks for FSDP, but accelerate {accelerate.__version__} runs this process "
                f"as {accelerator.distributed_type.value} ({accelerator.num_processes} process(es)): it shards with FSDP "
                "only over several GPU (or XPU/NPU) processes, never on the CPU, so this run would train unsharded. "
                "Launch it on GPUs, or without the FSDP config")
        return False
    version = accelerator.state.fsdp_plugin.fsdp_version
    if version != 2:
        raise FsdpRefused(f"the accelerate config's fsdp_version is {version}: tuneline shards with FSDP2 only "
                          "(fsdp_version: 2, as configs/accelerate/fsdp2.yaml)")
    return True


def set_wrap_blocks(accelerator: Any, family: str, modules: dict[str, Any], units: int) -> list[str]:
    """Fill the plugin's transformer-based wrap policy with the family's block classes (unless the config names
    its own) and check what accelerate's FSDP2 prepares: one trained module, one optimizer. Returns the names."""
    from tuneline.models.family import FAMILIES

    if len(modules) != 1 or units != 1:
        raise FsdpRefused(f"FSDP shards one trained module with one optimizer; this run trains {sorted(modules)} "
                          f"with {units} optimizer(s): keep the text encoders frozen (train.text_encoder_*.mode)")
    plugin = accelerator.state.fsdp_plugin
    if not plugin.transformer_cls_names_to_wrap:
        blocks = FAMILIES[family].shard_blocks if family in FAMILIES else ()
        if not blocks:
            raise FsdpRefused(f"the {family} family names no blocks to shard (Family.shard_blocks)")
        plugin.transformer_cls_names_to_wrap = list(blocks)
    return list(plugin.transformer_cls_names_to_wrap)


def full_tensors(named: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """(name, full tensor) of each (name, tensor): DTensor shards gathered (a collective: every process calls it)."""
    from torch.distributed.tensor import DTensor

    return [(name, t.full_tensor() if isinstance(t, DTensor) else t) for name, t in named]


def refuse_unrebuildable(modules: dict[str, Any]) -> None:
    """The final output is written from a plain copy of each trained module built from its config
    (`plain_copy`): refuse, before training, a module that cannot be rebuilt so (not a diffusers model)."""
    from diffusers.configuration_utils import ConfigMixin

    other = sorted(name for name, module in modules.items() if not isinstance(module, ConfigMixin))
    if other:
        raise FsdpRefused(f"FSDP writes the final weights through a copy of each trained module built from its "
                          f"config; {other} are not diffusers models (ConfigMixin)")


def full_state(module: Any, main: bool) -> dict[str, Any]:
    """The module's full state dict (parameters and persistent buffers) gathered to CPU tensors on the main
    process ({} on the others). A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload with full_state_dict: only rank 0 keeps the gathered tensors (the others get {}).
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if main else {}


def gathered(named: Iterable[tuple[str, Any]], main: bool) -> dict[str, Any]:
    """name -> full CPU tensor of each (name, DTensor) on the main process ({} on the others), gathered one
    tensor at a time. A collective: every process calls it, in the same order."""
    out = {}
    for name, tensor in full_tensors(list(named)):
        if main:
            out[name] = tensor.detach().to("cpu", copy=True)
        del tensor
    return out


def plain_copy(module: Any, state: dict[str, Any]) -> Any:
    """A plain (unsharded) module of `module`'s own diffusers class, built from its config without allocating
    weights and holding the tensors of `state` (a full state dict): what diffusers' save_pretrained writes
    exactly as it writes the unsharded module (FSDP2 swapped the module's class for an FSDP subclass)."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    with init_empty_weights():  # parameters on the meta device; buffers real (non-persistent ones are not in state)
        plain = cls.from_config(module.config)
    plain.load_state_dict({key: value.contiguous() for key, value in state.items()}, strict=True, assign=True)
    return plain


def save(accelerator: Any, folder: Path, ema_state: dict[str, Any] | None) -> None:
    """The model and optimizer shards (accelerate's save_state with the plugin's sharded state dict) and the
    EMA shadow's shards, every process writing its own part of `folder`."""
    import torch.distributed.checkpoint as dcp

    accelerator.save_state(str(folder / SHARDED_DIR))
    if ema_state is not None:
        dcp.save({"shadow": ema_state["shadow"]}, checkpoint_id=str(folder / EMA_SHARDED_DIR))


def load(accelerator: Any, folder: Path, ema_state: dict[str, Any] | None) -> None:
    """Load what `save` wrote into the live model, optimizer and EMA shadow (in place, resharded by
    torch.distributed.checkpoint to this run's processes)."""
    import torch.distributed.checkpoint as dcp

    accelerator.load_state(str(folder / SHARDED_DIR))
    if ema_state is not None:
        dcp.load({"shadow": ema_state["shadow"]}, checkpoint_id=str(folder / EMA_SHARDED_DIR))
