"""Exponential moving average of the trained weights (LoRA parameters or the full UNet)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tuneline.train.config import EmaConfig


class EMA:
    """An fp32 shadow copy of named trained parameters, averaged after optimizer steps.

    Update rule, at an update that is due (see `update`), with n = number of
    updates so far:

    - n == 0: shadow = live weights. The average starts from the weights at the
      first update (e.g. after `start_step`), not from the initial ones.
    - n >= 1: shadow = d * shadow + (1 - d) * live, where d = config.decay, or
      with config.warmup d = min(config.decay, (1 + n) / (10 + n)).

    The shadow is fp32 whatever the parameters' dtype, on the CPU when
    config.on_cpu, else on each parameter's device.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], config: EmaConfig) -> None:
        """Track `named_params` (only the trained ones) under the settings in `config`."""
        self.config = config
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, param in named_params:
            if name in self.params:
                raise ValueError(f"EMA: parameter name {name!r} appears twice")
            self.params[name] = param
        if not self.params:
            raise ValueError("EMA: no parameters to average (are any parameters trained?)")
        self.shadow: dict[str, torch.Tensor] = {
            name: self._to_shadow(param).clone() for name, param in self.params.items()
        }
        self.num_updates = 0

    def _to_shadow(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` detached, as fp32 on the shadow's device (may share memory if already there)."""
        device = torch.device("cpu") if self.config.on_cpu else tensor.device
        return tensor.detach().to(device=device, dtype=torch.float32)

    def decay(self) -> float:
        """The decay the next update would use (0.0 for the first update, which copies)."""
        n = self.num_updates
        if n == 0:
            return 0.0
        if self.config.warmup:
            return min(self.config.decay, (1 + n) / (10 + n))
        return self.config.decay

    def is_due(self, optimizer_step: int) -> bool:
        """Whether `update(optimizer_step)` would average: step >= start_step and step % every == 0."""
        return optimizer_step >= self.config.start_step and optimizer_step % self.config.every == 0

    @torch.no_grad()
    def update(self, optimizer_step: int) -> bool:
        """Average the live weights into the shadow if due; returns whether it did.

        `optimizer_step` is the number of optimizer steps taken, counting the one
        just made. Nothing happens before config.start_step or when the step is not
        a multiple of config.every.
        """
        if not self.is_due(optimizer_step):
            return False
        weight = 1.0 - self.decay()
        for name, param in self.params.items():
            # lerp_: shadow += (1 - d) * (live - shadow); exact when live == shadow.
            self.shadow[name].lerp_(self._to_shadow(param), weight)
        self.num_updates += 1
        return True

    @contextmanager
    def swap(self) -> Iterator[None]:
        """Put the EMA weights into the model for the `with` block, then restore the live ones exactly.

        The live weights are kept as exact copies (on the CPU when config.on_cpu)
        and copied back even when the block raises, so training continues bit-exactly.
        """
        backup_device = torch.device("cpu") if self.config.on_cpu else None
        with torch.no_grad():
            backup = {
                name: param.detach().to(device=backup_device or param.device, copy=True)
                for name, param in self.params.items()
            }
            self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(backup[name])

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the tracked parameters with the EMA weights (cast to their dtype), e.g. before the final export."""
        for name, param in self.params.items():
            param.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, Any]:
        """{"num_updates": int, "shadow": {name: fp32 tensor}}; the tensors are the live shadow, not copies."""
        return {"num_updates": self.num_updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` exactly; the parameter names and shapes must match."""
        shadow = state["shadow"]
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the trained parameters: missing {missing[:5]}, unexpected {unexpected[:5]}"
                f" ({len(missing)} missing, {len(unexpected)} unexpected)"
            )
        for name, tensor in shadow.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA state for {name!r} has shape {tuple(tensor.shape)}, "
                    f"the parameter has {tuple(self.shadow[name].shape)}"
                )
        for name, tensor in shadow.items():
            self.shadow[name].copy_(tensor)
        self.num_updates = int(state["num_updates"])
