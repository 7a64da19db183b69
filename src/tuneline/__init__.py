"""tuneline: fine-tune text-to-image diffusion models as a pipeline of cached stages."""

__version__ = "0.1.0"
