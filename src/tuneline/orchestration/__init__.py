"""Running the pipeline outside DVC: stage specs read from dvc.yaml, content-derived cache
keys, the stage subprocess runner, params overrides, and the local services (`tuneline ui`,
`tuneline repro`).

Prefect itself is only imported by `flows/`; this package stays importable without it.
"""

from tuneline.orchestration.cachekey import (
    StageKey,
    output_fingerprint,
    outputs_match,
    read_record,
    stage_key,
    write_record,
)
from tuneline.orchestration.overrides import apply_overrides, overrides_model, write_params_file
from tuneline.orchestration.runner import StageProcessFailed, run_stage_process
from tuneline.orchestration.spec import StageSpec, load_stage_specs

__all__ = [
    "StageKey",
    "StageProcessFailed",
    "StageSpec",
    "apply_overrides",
    "load_stage_specs",
    "output_fingerprint",
    "outputs_match",
    "overrides_model",
    "read_record",
    "run_stage_process",
    "stage_key",
    "write_params_file",
    "write_record",
]
