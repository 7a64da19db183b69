"""Stage `autoencoder`: `python -m stages.autoencoder [--params params.yaml] [--root .]`."""

from tuneline.cli import stage_main

if __name__ == "__main__":
    stage_main("autoencoder")
