"""The trainer's contract with a model: what `Trainer` calls on an adapter, reads from its data
source and its config section, typed. Nothing here is probed with hasattr: every adapter (each
diffusion family's, the autoencoder's) implements all of `TrainerAdapter`.

An adapter declares its optimization units as `UnitSpec`s (tuneline.train.units).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from tuneline.models.config import ModelConfig
from tuneline.train.config import CheckpointConfig, EmaConfig, OptimizerConfig
from tuneline.train.sampler import SampleRef
from tuneline.train.units import UnitSpec


class TrainerConfig(Protocol):
    """The params section a trainer runs on (`train`, `autoencoder`): what the core reads of it.

    `SECTION` names it in messages ("train.lr: 0.001 -> 0.002"); its dump (model_dump) is part of
    the run key and of every checkpoint."""

    SECTION: ClassVar[str]

    @property
    def seed(self) -> int | None: ...
    @property
    def num_steps(self) -> int | None: ...
    @property
    def num_epochs(self) -> int | None: ...
    @property
    def gradient_accumulation(self) -> int: ...
    @property
    def mixed_precision(self) -> str: ...
    @property
    def optimizer(self) -> OptimizerConfig: ...
    @property
    def ema(self) -> EmaConfig: ...
    @property
    def checkpoint(self) -> CheckpointConfig: ...
    @property
    def log_every(self) -> int: ...
    @property
    def compile(self) -> bool: ...
    @property
    def compile_scope(self) -> str: ...
    @property
    def channels_last(self) -> bool: ...

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]: ...


class TrainingData(Protocol):
    """Where batches come from (the latents stage's output, the autoencoder's crops), built by the stage."""

    @property
    def text_cache(self) -> bool:
        """Every batch carries its text embeddings: no text encoder is loaded for training."""
        ...

    def digest(self) -> str:
        """The data's identity: part of the run key (other data, other run)."""
        ...

    def batching(self) -> dict[str, int]:
        """The batch sizes that fix the batch sequence with the seed: part of the run key."""
        ...

    def sample_refs(self) -> list[SampleRef]: ...

    def batch_size_for(self, bucket: tuple[int, int]) -> int: ...

    def batch(self, indices: list[int], generator: Any, python_rng: random.Random, device: Any) -> dict[str, Any]:
        """One batch of the items at `indices` (one bucket), every random draw from the two generators."""
        ...


class ValidationData(Protocol):
    """The held-out items (datasets[].validation) the validation loss reads: the latents stage's output."""

    def validation_refs(self) -> list[SampleRef]:
        """Each held-out item once, indexed into the held-out list."""
        ...

    def validation_datasets(self) -> list[str]:
        """The data sets the held-out items belong to, sorted."""
        ...

    def batch_size_for(self, bucket: tuple[int, int]) -> int: ...

    def validation_batch(self, indices: list[int], seed: int, device: Any) -> dict[str, Any]:
        """A batch of held-out items (one bucket) with `noise` and `datasets`, every draw fixed by (seed, item id)."""
        ...


class TrainerAdapter(Protocol):
    """Everything the trainer core calls on a model.

    Order of calls: load, setup_training, trained_modules / optimization_units / ema_modules (the
    modules it prepares, optimizes and averages), frozen_modules (moved to the device); then
    unit_losses every micro-batch and save at the end."""

    family: str  # the family's (or kind's) name, recorded with the trained result
    compiled_module: str  # the trained module train.compile compiles (the denoiser)

    def load(self, conditioning_cached: bool = False) -> None:
        """Load the modules; with `conditioning_cached` the batches carry text embeddings (no encoders)."""
        ...

    def setup_training(self, device: Any = None) -> None:
        """Freeze, add adapters, cast frozen weights: ready for trained_modules(). `device`: where the
        training runs (model.quantize quantizes the frozen layers there; None: where they are)."""
        ...

    def trained_modules(self) -> dict[str, Any]:
        """name -> module with trained parameters (the trainer prepares them; checkpoints key on the names)."""
        ...

    def frozen_modules(self) -> dict[str, Any]:
        """name -> module a step uses without training it (moved to the device)."""
        ...

    def optimization_units(self, modules: dict[str, Any]) -> list[UnitSpec]:
        """The units over `modules` (trained_modules()); the first one's loss is the step's loss."""
        ...

    def ema_modules(self) -> list[str]:
        """Names of the trained modules the EMA averages (the autoencoder's VAE, not its discriminator)."""
        ...

    def unit_losses(self, modules: dict[str, Any], batch: dict[str, Any], generator: Any, step: int,
                    due: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """({unit name: loss} for the `due` units, per-batch facts to log as device tensors) at `step`
        (optimizer steps done so far); every random draw from `generator`."""
        ...

    def state_tensors(self, modules: dict[str, Any]) -> dict[str, Any]:
        """name -> live tensor that a step changes outside the optimizer (a VQ codebook and its EMA statistics;
        none for a diffusion family): saved in every checkpoint, copied back in place on resume."""
        ...

    def save(self, modules: dict[str, Any], out_dir: Path) -> Path:
        """Write the trained result (unwrapped modules) in the family's own format."""
        ...


class DiffusionAdapter(TrainerAdapter, Protocol):
    """A diffusion family's adapter: one loss, and what the memory estimate and live samples use."""

    prediction_type: str
    text_encoders: list[Any]

    def load(self, conditioning_cached: bool = False, empty_weights: bool = False) -> None: ...

    def loss(self, modules: dict[str, Any], batch: dict[str, Any], generator: Any, step: int) -> tuple[Any, dict]:
        """The weighted mean loss of the batch (the "model" unit's), and per-batch facts to log."""
        ...

    def per_sample_losses(self, modules: dict[str, Any], batch: dict[str, Any], noise: Any, timesteps: Any,
                          step: int) -> tuple[Any, Any]:
        """(weighted, unweighted) loss of each sample of `batch` at the given `noise` (like the latents) and
        `timesteps` (one per sample, 1..999: the DDPM timestep, or sigma * 1000 for flow matching): the
        training loss's terms without its random draws (the validation loss). Weighted: the noise-level
        weighting and the data set's weight, as `loss` averages them."""
        ...

    def example_batch(self, batch_size: int, bucket: tuple[int, int], device: Any, with_text: bool = True) -> dict:
        """A batch shaped like the data's at `bucket` (the memory estimate runs it on the meta device)."""
        ...

    def ensure_text_encoders(self, device: str = "cpu") -> list[Any]: ...


@dataclass(frozen=True)
class ModelSource:
    """The model a run starts from: the model section as written and the content identity of its weight
    files (model.base, model.vae, model.training_adapter). Both are in the run key: a model replaced in place
    is a different run."""

    settings: dict[str, Any]  # ModelConfig.model_dump(mode="json")
    identity: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, model: ModelConfig, root: Path) -> "ModelSource":
        """`model` (a ModelConfig) with the digests of the files model.base, model.vae and model.training_adapter
        name (hub ids: id@revision)."""
        from tuneline.models.ref import _default_digests, model_identity
        from tuneline.models.training_adapter import KEY, adapter_identity

        references = {"model.base": (model.base, model.revision)}
        if model.vae:
            references["model.vae"] = (model.vae, None)
        digests = _default_digests(root)
        try:
            identity = {key: model_identity(ref, revision, root=root, digests=digests)
                        for key, (ref, revision) in references.items()}
            if model.training_adapter is not None:
                identity[KEY] = adapter_identity(model.training_adapter, root, digests)
        finally:
            digests.close()
        return cls(model.model_dump(mode="json"), identity)
