"""What the stages ask of a family's heavy parts, as typed Protocols and the records they speak in:
the latents stage's `TextCache`, the render stage's `Renderer`, the export stage's `Exporter`
(with `ExportedFile` and `HeaderFacts`). `tuneline.models.base.Family` names the implementations by
import path; each family package holds its own. Plain types, no torch.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tuneline.models.config import ModelConfig
    from tuneline.train.config import LoraConfig, TrainConfig

PROVENANCE_KEYS = ("data_digest", "params_digest", "code_version", "mlflow_run_id", "git_commit", "git_dirty")


# --- the text-embedding cache (Family.text_cache) -------------------------------------------


class Identified(Protocol):
    """A model component whose identity goes into a cache key (tuneline.models.loading.ComponentSource)."""

    def identity(self, root: Path | None) -> str: ...


@dataclass
class EncodedText:
    """One caption's stored embedding: its tensors, the family's own metadata fields, and whether
    the caption was longer than the encoder takes (cut as the pipeline cuts it)."""

    tensors: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False


class TextCache(Protocol):
    """What the latents stage asks of a family's text-embedding cache: one stored file per
    distinct caption. The family decides which components encode it (their identities go into
    the key), what else decides the result (`key_fields`), the file's tensors and metadata
    (`encode`) and its `format` name; the stage owns the store, the code version in the key,
    batching, the writes and the report."""

    format: str  # written into every stored file, and the summary's text_embeddings_format
    # How a caption that was cut reads in the stage's warning ("longer than N tokens ..."); a
    # cache whose encode never sets `truncated` may leave it empty.
    truncation: str

    def sources(self, model: ModelConfig, root: Path | None) -> dict[str, Identified]:
        """The tokenizers and text encoders, by name: their identities go into every key."""
        ...

    def key_fields(self, caption: str, identities: dict[str, str], dtype: str, quantize: str) -> dict[str, Any]:
        """Everything but the stage's code version that decides `caption`'s stored embedding;
        `quantize` is model.quantize, which `load` encodes with (a level other than 'none' is in the key)."""
        ...

    def load(self, model: ModelConfig, root: Path | None, dtype: str, device: str) -> Any:
        """The frozen encoders (and tokenizers), as `encode` takes them."""
        ...

    def order(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """(key, caption) pairs in the order they are batched (results must not depend on it)."""
        ...

    def encode(self, models: Any, captions: list[str], device: str) -> list[EncodedText]:
        """One EncodedText per caption, its tensors on the host (called under torch.inference_mode)."""
        ...

    def summary(self) -> dict[str, Any]:
        """Fields for the output folder's latents.json while the cache is on."""
        ...


# --- what the render and export stages ask a family --------------------------------------------------

@dataclass
class ExportedFile:
    """One file of the export: its name, what it is, and which trained components it carries."""

    name: str
    kind: str  # "checkpoint", "lora" or "vae"
    components: list[str]
    description: str


@dataclass(frozen=True)
class HeaderFacts:
    """What every file of one export says of the training run (the family's header adds its own keys)."""

    title: str
    data_digest: str
    params_digest: str
    code_version: str
    mlflow_run_id: str | None
    git_commit: str
    git_dirty: bool | None
    date: _dt.datetime | None  # when the weights were made (not when they were exported)
    prediction_type: str
    zero_terminal_snr: bool
    resolution: tuple[int, int]
    trigger_phrase: str | None
    training_started_at: _dt.datetime | None = None

    def provenance_args(self) -> dict[str, Any]:
        """The provenance entries' arguments (tuneline.models.export.provenance_metadata)."""
        return {key: getattr(self, key) for key in PROVENANCE_KEYS}


class Renderer(Protocol):
    """What rendering asks a family beyond its RenderFacts (`Family.renderer`, built with no arguments)."""

    def scheduler_settings(self, prediction_type: str | None, zero_terminal_snr: bool) -> dict[str, Any]:
        """Scheduler config entries that make the base's scheduler sample what training learned ({}: none)."""
        ...

    def pipeline_from_training(self, adapter: Any, modules: Mapping[str, Any], vae: Any = None,
                               text_encoders: bool = True) -> Any:
        """The family's text-to-image pipeline sharing the live training modules (live samples); without
        `text_encoders` it has none (nor tokenizers) and renders from cached embeddings only."""
        ...

    def text_inputs(self, pipeline: Any, prompt: str, negative_prompt: str | None, guidance_scale: float,
                    embedded: Callable[[str], Mapping[str, Any]] | None) -> dict[str, Any]:
        """The text arguments of one call of `pipeline` (text-to-image or image-to-image): the texts
        (`embedded` None: the pipeline's text encoders encode them), else each needed text's cached
        tensors `embedded(text)` (as the family's TextCache stored them) in the form the pipeline takes,
        so that the image equals the one rendered from the texts."""
        ...

    def diagnostic_rows(self, pipeline: Any, latents_dir: Path, timesteps: Sequence[int], samples: int,
                        token: str | None, trigger_words: Mapping[str, str | None],
                        seed: int = 0) -> tuple[list[tuple[str, list[Any]]], list[str], list[str]]:
        """(rows of (label, tiles), column labels, warnings) of the diagnostic sheet; only asked of a
        family whose RenderFacts.diagnostics is None."""
        ...


class Exporter(Protocol):
    """What the export stage asks a family (`Family.exporter`, built with no arguments): which trained
    parts there are, how its files are described, headed and written, and the model card lines that
    differ between families."""

    components: Mapping[str, str]  # trained part (as trained_modes names it) -> its name for people
    vae_layout: str  # how the standalone VAE file is laid out and where it goes

    def trained_modes(self, trained: TrainConfig) -> dict[str, str]:
        """Trained part -> frozen, lora or full, as the run trained it; ValueError when it cannot export."""
        ...

    def names(self, parts: Sequence[str]) -> str:
        """The parts' names for people, joined ("UNet and text encoder 1 ...")."""
        ...

    def checkpoint_description(self, full: Sequence[str], untouched: Sequence[str], dtype: str) -> str: ...

    def lora_kind(self, lora: LoraConfig) -> str:
        """What the LoRA file is ("kohya LoRA", ...): the model card's and report's first words of it."""
        ...

    def component_line(self, name: str, mode: str, lora: LoraConfig) -> str:
        """The model card's line of one trained part."""
        ...

    def header(self, kind: str, facts: HeaderFacts, extra: Mapping[str, str], *, file_name: str, lora: LoraConfig,
               description: str | None = None) -> dict[str, str]:
        """The safetensors header of a file of `kind` (checkpoint, lora, vae)."""
        ...

    def write_checkpoint(self, pipeline_dir: Path, out: Path, dtype: str, metadata: Mapping[str, str]) -> Path: ...

    def write_lora(self, lora_file: Path, out: Path, metadata: Mapping[str, str], model: ModelConfig,
                   root: Path) -> Path: ...

    def write_vae(self, state_dict: Mapping[str, Any], config: Mapping[str, Any], out: Path, dtype: str,
                  metadata: Mapping[str, str]) -> Path: ...

    def card_training(self, prediction_type: str, trained: TrainConfig, resolution: int) -> str:
        """The model card's line of the training objective."""
        ...

    def card_use(self, files: Sequence[ExportedFile], prediction_type: str, trained: TrainConfig) -> list[str]:
        """The model card's "Use" section: where the files go and how to load them."""
        ...
