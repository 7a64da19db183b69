"""Stage `latents`: `python -m stages.latents [--params params.yaml] [--root .]`."""

from tuneline.cli import stage_main

if __name__ == "__main__":
    stage_main("latents")
