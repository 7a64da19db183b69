"""Stage `scan`: `python -m stages.scan [--params params.yaml] [--root .]`."""

from tuneline.cli import stage_main

if __name__ == "__main__":
    stage_main("scan")
