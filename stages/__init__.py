"""Thin entry points, one per stage: `python -m stages.<name>` (what dvc.yaml runs)."""
