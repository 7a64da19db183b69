"""Stage `latents`."""
