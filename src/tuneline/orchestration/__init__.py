"""Running the stages: the stage registry (order, folders, runners), the stage specs read
from dvc.yaml, content-derived cache keys, the stage subprocess runner, params overrides,
the Prefect flow and its served deployment, and the local services (`tuneline ui`,
`tuneline repro`).

Prefect is imported only by `flow` and `serve`; the rest stays importable without it.
"""
