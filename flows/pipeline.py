"""The pipeline as a Prefect flow: `python -m flows.pipeline [-S train.lr=1e-4 ...]`.

The flow lives in the library (tuneline.orchestration.flow); this entry point runs it from
the project root, like stages/ does for single stages.
"""

from tuneline.orchestration.flow import ParamsOverrides, main, pipeline

__all__ = ["ParamsOverrides", "main", "pipeline"]

if __name__ == "__main__":
    raise SystemExit(main())
