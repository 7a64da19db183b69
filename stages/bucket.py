"""Stage `bucket`: `python -m stages.bucket [--params params.yaml] [--root .]`."""

from tuneline.cli import stage_main

if __name__ == "__main__":
    stage_main("bucket")
