"""params.yaml as one typed object: `Params` composes the sections of every stage.

Each stage's section lives beside the stage (`tuneline.stages.<name>.config`), the trainer
core's settings in `tuneline.train.config`, the model's in `tuneline.models.config`, MLflow's
in `tuneline.core.tracking.config`; all of them are plain pydantic, so validating params.yaml
imports no torch. `load_params` checks every key before anything runs: an unknown key is named
with the closest valid one and the keys allowed where it stands, a bad value with its allowed
values (see `tuneline.core.params`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from tuneline.core.fsutil import ProjectPath, safe_name
from tuneline.core.params import Section, read_params_file, validate_model
from tuneline.core.tracking.config import TrackingConfig
from tuneline.models.config import ModelConfig
from tuneline.stages.autoencoder.config import AutoencoderConfig
from tuneline.stages.bucket.config import BucketConfig, BucketOverrides, BucketSettings
from tuneline.stages.caption.config import CaptionConfig
from tuneline.stages.export.config import ExportConfig
from tuneline.stages.ingest.config import IngestConfig
from tuneline.stages.latents.config import LatentsConfig
from tuneline.stages.render.config import RenderConfig
from tuneline.train.config import DatasetLossConfig, StructureConfig, TrainConfig
from tuneline.train.prior import CLASS_IMAGES, PRIOR_PREDICTION, PRIORS, REGULARIZATION, ROLES, TRAIN
from tuneline.core.split import ALL, ALLOWED as VALIDATION_ALLOWED, parse_validation


class DatasetConfig(Section):
    """One folder of training images with its own settings."""

    name: str = Field(description="Data set name; also its folder name in every stage output.")
    # Inside the project: dvc.yaml tracks data/raw, and a form run must not read any folder of the machine.
    path: ProjectPath = Field(
        description="Folder of images (searched recursively), relative to the project root and inside it "
        "(symlink a folder kept elsewhere into data/raw).")
    repeats: int = Field(1, ge=1, description="How many times each image is seen per epoch.")
    loss_weight: float = Field(1.0, gt=0, description="Weight of this data set's samples in the loss.")
    trigger_word: Optional[str] = Field(
        None, description="Put at the front of every caption of this data set (once)."
    )
    bucket: Optional[BucketOverrides] = Field(  # type: ignore[valid-type]
        None, description="Overrides of the bucket section for this data set only."
    )
    loss: Optional[DatasetLossConfig] = Field(
        None, description="This data set's own loss settings: `structure: {struct, light, color, tex}`, its "
        "style/structure weights; each term set here replaces train.loss.structure's for its samples, a term "
        "left out takes train.loss.structure's value (null: all of them).")
    role: Literal["train", "regularization"] = Field(
        TRAIN, description="train: the subject; regularization: images of its class (or prompts of it) that keep the "
        "LoRA from drifting the whole class (prior regularization), weighted by prior_loss_weight and logged apart "
        "(loss/prior).")
    prior: Optional[Literal["class_images", "prior_prediction"]] = Field(
        None, description="role regularization only: class_images (DreamBooth prior preservation: the images and "
        "captions train as usual; the default) or prior_prediction (OneTrainer: the target is the base model's own "
        "prediction with the LoRA switched off, so the images need not show the class; train.mode lora only).")
    prior_loss_weight: float = Field(
        1.0, gt=0, description="role regularization only: the weight of its samples in the loss (times loss_weight), "
        "as diffusers' --prior_loss_weight.")
    validation: Optional[Union[int, float, str]] = Field(
        None, description="Images held out of training for the validation loss, chosen by each image's content "
        f"id (tuneline.core.split): {VALIDATION_ALLOWED}. A fraction never moves an image when others are "
        "added, removed or renamed; a count moves at most one. Changing it recomputes no latent.")

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str) -> str:
        if not safe_name(value):
            raise ValueError(f"data set name {value!r} has no usable characters (use letters, digits, . _ -)")
        return value

    @field_validator("validation", mode="before")
    @classmethod
    def _validation(cls, value: Any) -> Any:
        return parse_validation(value)

    @model_validator(mode="after")
    def _prior_needs_regularization(self) -> "DatasetConfig":
        if self.role == TRAIN:
            for key, value, default in (("prior", self.prior, None),
                                        ("prior_loss_weight", self.prior_loss_weight, 1.0)):
                if value != default:
                    # Located by the caller as datasets[<name>]: the message names the key.
                    raise ValueError(f"{key} {value!r} applies to a regularization data set only; set role: "
                                     f"{REGULARIZATION} (allowed roles: {', '.join(ROLES)}) or leave {key} out")
        return self

    @property
    def folder(self) -> str:
        """The name as a safe folder name (no separators, no traversal)."""
        return safe_name(self.name)

    @property
    def prior_kind(self) -> str | None:
        """How a regularization data set regularizes (one of tuneline.train.prior.PRIORS); None for one that trains."""
        return None if self.role == TRAIN else (self.prior or CLASS_IMAGES)


class Params(Section):
    """The whole params.yaml."""

    store_dir: ProjectPath = Field(
        Path(".tuneline/store"),
        description="Persistent per-item result store (outside DVC outs); relative to the project root and inside "
        "it (symlink it to another disk if needed).",
    )
    pack_digits: int = Field(
        2, ge=1, le=4,
        description="Stage outputs keep item files in packs named by the first pack_digits hex digits of the item's "
        "content id: at most 16^pack_digits packs per data set (2: 256). A new image rewrites one pack per stage, "
        "of about images/16^pack_digits items; DVC checks one file per pack. 2 suits up to about 100k images a "
        "data set, 3 up to a few million. A change repacks the outputs and recomputes nothing.",
    )
    datasets: list[DatasetConfig] = Field(min_length=1, description="The data sets of this run.")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="Stage ingest.")
    bucket: BucketConfig = Field(default_factory=BucketConfig, description="Stage bucket.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig, description="Stage autoencoder.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Stage train.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Stage export.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    caption: CaptionConfig = Field(default_factory=CaptionConfig, description="Stage caption.")
    latents: LatentsConfig = Field(default_factory=LatentsConfig, description="Stage latents.")
    render: RenderConfig = Field(default_factory=RenderConfig, description="Stage render.")

    @model_validator(mode="after")
    def _unique_folders(self) -> "Params":
        seen: dict[str, str] = {}
        for dataset in self.datasets:
            if dataset.folder in seen:
                raise ValueError(
                    f"datasets[{dataset.name}].name: data sets {seen[dataset.folder]!r} and {dataset.name!r} map to "
                    f"the same folder name {dataset.folder!r}; rename one"
                )
            seen[dataset.folder] = dataset.name
            try:
                self.bucket_settings_for(dataset)
            except ValidationError as error:
                reasons = "; ".join(item["msg"] for item in error.errors())
                raise ValueError(f"datasets[{dataset.name}].bucket: {reasons}") from None
        return self

    @model_validator(mode="after")
    def _something_trains(self) -> "Params":
        if all(dataset.validation == ALL for dataset in self.datasets):
            names = ", ".join(f"datasets[{dataset.name}].validation" for dataset in self.datasets)
            raise ValueError(f"{names}: every data set is validation-only ('all'): nothing to train on; "
                             f"allowed: {VALIDATION_ALLOWED}, with at least one data set that trains")
        regularizing = [dataset for dataset in self.datasets if dataset.role == REGULARIZATION]
        if regularizing and not any(dataset.role == TRAIN and dataset.validation != ALL for dataset in self.datasets):
            names = ", ".join(f"datasets[{dataset.name}].role" for dataset in regularizing)
            raise ValueError(f"{names}: {REGULARIZATION!r} keeps a subject's training from drifting its class, and no "
                             f"data set trains a subject beside it; allowed roles: {', '.join(ROLES)}, with at least "
                             f"one data set of role {TRAIN!r} that is not validation-only")
        return self

    @model_validator(mode="after")
    def _prior_prediction_needs_lora(self) -> "Params":
        """prior_prediction switches the trained LoRA off to get the base model's prediction: a module trained
        fully has nothing to switch off."""
        predicting = [dataset.name for dataset in self.datasets if dataset.prior_kind == PRIOR_PREDICTION]
        if not predicting:
            return self
        train = self.train
        modes = {"train.mode": train.mode, "train.text_encoder_1.mode": train.text_encoder_1.mode,
                 "train.text_encoder_2.mode": train.text_encoder_2.mode}
        full = [key for key, mode in modes.items() if mode == "full"]
        if full:
            names = ", ".join(f"datasets[{name}].prior" for name in predicting)
            raise ValueError(f"{names}: {PRIOR_PREDICTION!r} needs every trained module to be a LoRA (its target is "
                             f"the base model's prediction with the LoRA switched off), and {', '.join(full)} is "
                             f"'full'; allowed with 'full': prior {CLASS_IMAGES!r} (allowed priors: "
                             f"{', '.join(PRIORS)}), or set the mode to 'lora'")
        return self

    @model_validator(mode="after")
    def _crop_fits_a_bucket(self) -> "Params":
        """An autoencoder crop longer than the shorter side of every bucket can never be taken: the
        stage would cut it to the smallest bucket side without a word, after bucket has run."""
        if not self.autoencoder.enabled:
            return self
        longest = max(min(bucket) for dataset in self.datasets for bucket in self.buckets_for(dataset))
        if self.autoencoder.crop_size > longest:
            raise ValueError(
                f"autoencoder.crop_size: {self.autoencoder.crop_size} is longer than the shorter side of every "
                f"bucket (the longest is {longest}, from the bucket section and the data sets' overrides); "
                f"allowed: a multiple of 8 from 16 to {longest // 8 * 8}, or larger buckets")
        return self

    def bucket_settings_for(self, dataset: DatasetConfig) -> BucketSettings:
        """The bucket section with this data set's overrides applied."""
        merged = self.bucket.settings().model_dump()
        if dataset.bucket is not None:
            merged.update(dataset.bucket.model_dump(exclude_none=True))
        return BucketSettings(**merged)

    def structure_for(self, dataset: DatasetConfig) -> StructureConfig:
        """The style/structure weights of this data set's samples: train.loss.structure with the terms the
        data set sets (datasets[].loss.structure) replaced."""
        if dataset.loss is None:
            return self.train.loss.structure
        return dataset.loss.structure.over(self.train.loss.structure)

    def buckets_for(self, dataset: DatasetConfig) -> list[tuple[int, int]]:
        """The buckets the bucket stage generates for this data set (its overrides applied)."""
        from tuneline.stages.bucket.aspect import generate_buckets

        return [tuple(bucket) for bucket in generate_buckets(self.bucket_settings_for(dataset))]

    def dataset(self, folder: str) -> DatasetConfig:
        for dataset in self.datasets:
            if dataset.folder == folder:
                return dataset
        raise KeyError(folder)


def validate_params(data: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ParamsError naming every bad key."""
    return validate_model(Params, data, source)


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    return validate_params(read_params_file(path), str(path))
