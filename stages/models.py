"""Stage `models`: `python -m stages.models [--params params.yaml] [--root .]`."""

from tuneline.cli import stage_main

if __name__ == "__main__":
    stage_main("models")
