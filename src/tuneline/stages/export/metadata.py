"""safetensors header metadata for exports: kohya `ss_*`, SAI `modelspec.*`, tuneline provenance.

A safetensors header holds strings only; every helper here returns `dict[str, str]`.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Any

SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "v": "v"}


def _iso(moment: _dt.datetime | str | None) -> str:
    if isinstance(moment, str):
        return moment
    moment = moment or _dt.datetime.now(_dt.timezone.utc)
    return moment.replace(microsecond=0).isoformat()


def modelspec_metadata(
    *,
    architecture: str,
    title: str,
    resolution: tuple[int, int] = (1024, 1024),
    prediction_type: str = "epsilon",
    trigger_phrase: str | None = None,
    date: _dt.datetime | str | None = None,
    description: str | None = None,
) -> dict[str, str]:
    """SAI model spec 1.0.0 keys (what ComfyUI / A1111 / SAI tooling read)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; expected one of {sorted(PREDICTION_TYPES)}")
    width, height = resolution
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": SGM_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": PREDICTION_TYPES[prediction_type],
        "modelspec.date": _iso(date),
    }
    if trigger_phrase:
        meta["modelspec.trigger_phrase"] = trigger_phrase
    if description:
        meta["modelspec.description"] = description
    return meta


def provenance_metadata(
    *, data_digest: str, params_digest: str, code_version: str, mlflow_run_id: str | None = None
) -> dict[str, str]:
    """What produced the weights: data set, parameters, code, and the MLflow run that logged it."""
    return {
        "tuneline.data_digest": data_digest,
        "tuneline.params_digest": params_digest,
        "tuneline.code_version": code_version,
        "tuneline.mlflow_run_id": mlflow_run_id or "",
    }


def kohya_metadata(
    *,
    title: str,
    rank: int | str,
    alpha: float | str,
    data_digest: str,
    params_digest: str,
    code_version: str,
    mlflow_run_id: str | None = None,
    prediction_type: str = "epsilon",
    resolution: tuple[int, int] = (1024, 1024),
    trigger_phrase: str | None = None,
    output_name: str | None = None,
    training_started_at: _dt.datetime | str | None = None,
    date: _dt.datetime | str | None = None,
    base_model_version: str = "sdxl_base_v1-0",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Header of a kohya-format SDXL LoRA: the minimal `ss_*` set, `modelspec.*` and provenance.

    `rank`/`alpha` are the network dim and alpha (pass "Dynamic" when they vary per module,
    as kohya does). `alpha` is the REAL alpha the LoRA was trained with, never the rank.
    """
    meta = {
        "ss_base_model_version": base_model_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_output_name": output_name or title,
        "ss_v2": "False",
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_prediction_type": PREDICTION_TYPES.get(prediction_type, prediction_type),
    }
    if training_started_at is not None:
        started = training_started_at
        if isinstance(started, _dt.datetime):  # kohya stores a unix timestamp
            started = str(started.timestamp())
        meta["ss_training_started_at"] = str(started)
    meta.update(modelspec_metadata(
        architecture=f"{SDXL_ARCHITECTURE}/lora", title=title, resolution=resolution,
        prediction_type=prediction_type, trigger_phrase=trigger_phrase, date=date))
    meta.update(provenance_metadata(data_digest=data_digest, params_digest=params_digest,
                                    code_version=code_version, mlflow_run_id=mlflow_run_id))
    for key, value in (extra or {}).items():
        meta[str(key)] = str(value)
    return meta


def checkpoint_metadata(
    *,
    title: str,
    data_digest: str,
    params_digest: str,
    code_version: str,
    mlflow_run_id: str | None = None,
    prediction_type: str = "epsilon",
    resolution: tuple[int, int] = (1024, 1024),
    trigger_phrase: str | None = None,
    date: _dt.datetime | str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Header of a full SDXL single-file checkpoint: `modelspec.*` and provenance."""
    meta = modelspec_metadata(architecture=SDXL_ARCHITECTURE, title=title, resolution=resolution,
                              prediction_type=prediction_type, trigger_phrase=trigger_phrase, date=date)
    meta.update(provenance_metadata(data_digest=data_digest, params_digest=params_digest,
                                    code_version=code_version, mlflow_run_id=mlflow_run_id))
    for key, value in (extra or {}).items():
        meta[str(key)] = str(value)
    return meta


def check_header(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Refuse non-string header values instead of letting safetensors fail deep inside."""
    metadata = dict(metadata or {})
    bad = {key: type(value).__name__ for key, value in metadata.items()
           if not isinstance(key, str) or not isinstance(value, str)}
    if bad:
        raise TypeError(f"safetensors metadata must be str -> str; not strings: {bad}")
    return metadata
