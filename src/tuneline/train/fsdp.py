"""Full fine-tunes sharded with FSDP2 through accelerate (`accelerate launch --config_file configs/accelerate/fsdp2.yaml`).

accelerate reads the FSDP plugin from the launch config; the trainer only asks `sharded(accelerator)`. Under it:
- the wrap policy's block classes come from the family (`Family.shard_blocks`) unless the config names its own;
- the trained parameters, their gradients, the optimizer state and the EMA shadow are DTensors, each process
  holding 1/N of every one;
- a checkpoint keeps the single-process layout's files (state json, `trained.safetensors` gathered to full
  weights, `training.pt` with the schedules and the grad scaler, `rng_rank*.pt`) and adds the sharded state:
  `fsdp/` (accelerate's save_state: the model and optimizer as torch.distributed.checkpoint shards) and `ema/`
  (the EMA shadow, the same format).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SHARDED_LAYOUT = "fsdp2"  # the state json's `sharded` (absent: the single-process layout)
SHARDED_DIR = "fsdp"  # accelerate.save_state of the model and optimizer shards
EMA_SHARDED_DIR = "ema"  # the EMA shadow's shards (torch.distributed.checkpoint)


class FsdpRefused(ValueError):
    """A setting FSDP cannot shard, named with its value."""


def sharded(accelerator: Any) -> bool:
    """Whether accelerate runs this process under FSDP; refuses FSDP1 (tuneline shards with FSDP2 only)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
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


@contextmanager
def unsharded(modules: list[Any]) -> Iterator[None]:
    """Every FSDP unit of `modules` holds its full parameters inside (collective, every process): what a writer
    that expects plain tensors (the adapter's diffusers save) reads. Resharded after."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for module in modules for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


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
