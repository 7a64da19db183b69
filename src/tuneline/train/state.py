"""TrainState: where a run is (step, epoch, position in the epoch) and every RNG state.

Exact resume needs all of them: the data order comes from (seed, epoch, position); the
noise, timesteps, latent samples, flips and caption augmentation come from the
trainer's own generators; dropout comes from torch's global generator.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainState:
    seed: int
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    position: int = 0  # batches of `epoch` already consumed by this process
    micro_step: int = 0  # micro-batches done (for gradient accumulation)
    samples_seen: int = 0
    best_validation_step: int = 0  # the step of the lowest validation loss so far (0: none yet)
    best_validation_loss: float | None = None  # that loss (train.validation)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per (re)start

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainState":
        return cls(**data)


class TrainRandom:
    """The trainer's generators: torch (noise, timesteps, latent samples) and python (captions, flips)."""

    def __init__(self, seed: int, rank: int, device: Any) -> None:
        import torch

        self.seed, self.rank = seed, rank
        self.torch = torch.Generator(device=device)
        self.torch.manual_seed(seed * 1000 + rank)  # each process its own stream
        self.python = random.Random(f"{seed}:{rank}")

    def state_dict(self) -> dict[str, Any]:
        import numpy as np
        import torch

        state = {
            "trainer_device": self.torch.device.type,
            "trainer_torch": self.torch.get_state(),
            "trainer_python": self.python.getstate(),
            "global_torch": torch.get_rng_state(),
            "global_python": random.getstate(),
            "global_numpy": _numpy_state_to_plain(np.random.get_state()),
        }
        if torch.cuda.is_available():
            state["global_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any], step: int) -> list[str]:
        """Restore every stream; returns warnings (a CUDA stream cannot continue on the CPU)."""
        import numpy as np
        import torch

        warnings = []
        if state["trainer_device"] == self.torch.device.type:
            self.torch.set_state(state["trainer_torch"])
        else:
            # Different generator algorithms per device: continue with a stream derived from the step.
            self.torch.manual_seed((self.seed * 1000 + self.rank) * 1_000_003 + step)
            warnings.append(f"checkpoint noise stream is from {state['trainer_device']}, this run is on "
                            f"{self.torch.device.type}: noise continues from a new seeded stream")
        self.python.setstate(state["trainer_python"])
        torch.set_rng_state(state["global_torch"])
        random.setstate(state["global_python"])
        np.random.set_state(_numpy_state_from_plain(state["global_numpy"]))
        # A GPU checkpoint resumes on CPU (and the reverse): CUDA states apply only where both exist.
        if "global_cuda" in state and torch.cuda.is_available():
            cuda_states = state["global_cuda"][: torch.cuda.device_count()]
            torch.cuda.set_rng_state_all(cuda_states)
        return warnings


def _numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    """numpy's legacy RNG state as tensors and numbers: checkpoints load with weights_only=True,
    which refuses numpy arrays (and any other pickled class)."""
    import torch

    name, keys, position, has_gauss, cached_gaussian = state
    return {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _numpy_state_from_plain(plain: dict[str, Any]) -> tuple:
    import numpy as np

    return (plain["name"], plain["keys"].numpy().astype(np.uint32), plain["position"], plain["has_gauss"],
            plain["cached_gaussian"])
