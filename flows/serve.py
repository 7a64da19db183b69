"""Serve the pipeline as a Prefect deployment: `python -m flows.serve` (= `tuneline serve`).

The deployment lives in the library (tuneline.orchestration.serve); this is its entry point.
"""

from tuneline.orchestration.serve import deployment, main

__all__ = ["deployment", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
