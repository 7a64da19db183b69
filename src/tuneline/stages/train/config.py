"""The `train` params section lives beside the trainer core that reads it: `tuneline.train.config`.

One section for every model family: the family of model.base (tuneline.models.family) says which
of its settings apply, and `tuneline check` refuses those that belong to another family."""

from tuneline.train.config import LoraConfig, TextEncoderConfig, TrainConfig, _yaml_no

__all__ = ["LoraConfig", "TextEncoderConfig", "TrainConfig", "_yaml_no"]
