"""The `autoencoder` params section lives beside the adapter that reads it:
`tuneline.models.autoencoder.config`."""

from tuneline.models.autoencoder.config import AutoencoderConfig, DiscriminatorConfig

__all__ = ["AutoencoderConfig", "DiscriminatorConfig"]
