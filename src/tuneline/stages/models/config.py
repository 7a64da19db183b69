"""The `model` params section lives with the code that reads it: `tuneline.models.config`."""

from tuneline.models.config import ModelConfig

__all__ = ["ModelConfig"]
