"""safetensors header metadata for exports: kohya `ss_*`, SAI `modelspec.*`, tuneline provenance.

A safetensors header holds strings only; every helper here returns `dict[str, str]`.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuneline.core.tensorfile import check_header  # noqa: F401  (moved to core: the model writers use it)

SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"
VAE_ARCHITECTURE = f"{SDXL_ARCHITECTURE}/vae"
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
# Z-Image's modelspec names, as kohya's musubi-tuner writes them (utils/sai_model_spec.py: ARCH_Z_IMAGE,
# IMPL_Z_IMAGE; a LoRA adds "/lora"); flow matching has no modelspec.prediction_type there.
ZIMAGE_ARCHITECTURE = "Z-Image"
ZIMAGE_IMPLEMENTATION = "https://github.com/Tongyi-MAI/Z-Image"
MODELSPEC_VERSION = "1.0.1"
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "v": "v"}


def _iso(moment: _dt.datetime | str) -> str:
    if isinstance(moment, str):
        return moment
    return moment.replace(microsecond=0).isoformat()


def modelspec_metadata(
    *,
    architecture: str,
    title: str,
    resolution: tuple[int, int] = (1024, 1024),
    prediction_type: str | None = "epsilon",
    trigger_phrase: str | None = None,
    date: _dt.datetime | str | None = None,
    description: str | None = None,
    implementation_version: str | None = None,
    implementation: str = SGM_IMPLEMENTATION,
) -> dict[str, str]:
    """SAI model spec 1.0.1 keys, as kohya sd-scripts writes them (ComfyUI / A1111 / SAI tooling read them).

    `prediction_type` None: no such key (a VAE predicts no noise; Z-Image's flow matching has none)."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; expected one of {sorted(PREDICTION_TYPES)}")
    width, height = resolution
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
    }
    if prediction_type is not None:
        meta["modelspec.prediction_type"] = PREDICTION_TYPES[prediction_type]
    if date is not None:  # never "now": an exported file must not change when its inputs do not
        meta["modelspec.date"] = _iso(date)
    optional = {"trigger_phrase": trigger_phrase, "description": description,
                "implementation_version": implementation_version}
    meta.update({f"modelspec.{key}": value for key, value in optional.items() if value})
    return meta


def code_provenance(code_dir: Path | None = None) -> dict[str, Any]:
    """The code that produced a file: tuneline's version plus the git commit and dirty flag of the
    checkout holding it (`0.1.0+g1a2b3c4d5e6f.dirty`), so the file alone names its code even with
    tracking off. Outside a git checkout: the version alone, commit "unknown".

    Dirty means uncommitted changes to the tuneline package only: in a project that is also the
    checkout, `dvc repro` rewrites dvc.lock, which must not change what an export says of its code."""
    import tuneline
    from tuneline import __version__
    from tuneline.core.tracking.tracker import git_commit, git_dirty

    code_dir = code_dir or Path(__file__).resolve().parent
    commit = git_commit(code_dir)
    if commit == "unknown":
        return {"code_version": __version__, "git_commit": commit, "git_dirty": None}
    dirty = git_dirty(code_dir, str(Path(tuneline.__file__).resolve().parent))
    return {"code_version": f"{__version__}+g{commit[:12]}" + (".dirty" if dirty else ""),
            "git_commit": commit, "git_dirty": dirty}


def provenance_metadata(
    *, data_digest: str, params_digest: str, code_version: str, mlflow_run_id: str | None = None,
    git_commit: str = "unknown", git_dirty: bool | None = None,
) -> dict[str, str]:
    """What produced the weights: data set, parameters, code (version, commit, dirty), the MLflow run."""
    return {
        "tuneline.data_digest": data_digest,
        "tuneline.params_digest": params_digest,
        "tuneline.code_version": code_version,
        "tuneline.git_commit": git_commit,
        "tuneline.git_dirty": "unknown" if git_dirty is None else str(git_dirty).lower(),
        "tuneline.mlflow_run_id": mlflow_run_id or "",
    }


def lora_network(lora: Any) -> tuple[str, dict[str, str]]:
    """(ss_network_module, ss_network_args) of a LoRA: the kohya network that loads it and its arguments,
    strings as kohya's `--network_args key=value` give them.

    Conv layers (targets "all") train with the same rank and alpha as the linear ones: conv_dim and
    conv_alpha. A DoRA has no place in kohya's networks.lora (it would drop dora_scale): LyCORIS
    loads it, with the weight decomposition on the output axis.
    """
    args: dict[str, str] = {}
    if lora.targets == "all":
        args |= {"conv_dim": str(lora.rank), "conv_alpha": str(float(lora.alpha))}
    if lora.dropout:
        args["dropout"] = str(lora.dropout)
    if lora.use_dora:
        return "lycoris.kohya", {"algo": "lora", **args, "dora_wd": "True", "wd_on_output": "True"}
    return "networks.lora", args


def _common(
    *, architecture: str, title: str, data_digest: str, params_digest: str, code_version: str,
    mlflow_run_id: str | None, git_commit: str, git_dirty: bool | None, prediction_type: str | None,
    zero_terminal_snr: bool | None, resolution: tuple[int, int], trigger_phrase: str | None,
    date: _dt.datetime | str | None, extra: Mapping[str, Any] | None, description: str | None = None,
    implementation: str = SGM_IMPLEMENTATION,
) -> dict[str, str]:
    """Every exported file's header: `modelspec.*`, provenance, `tuneline.zero_terminal_snr` (not
    written when None: a VAE, flow matching) and `extra`."""
    # kohya names its implementation version "sd-scripts/<commit>"; the same with our commit.
    implementation_version = f"tuneline/{git_commit if git_commit != 'unknown' else code_version}"
    meta = modelspec_metadata(architecture=architecture, title=title, resolution=resolution,
                              prediction_type=prediction_type, trigger_phrase=trigger_phrase, date=date,
                              description=description, implementation_version=implementation_version,
                              implementation=implementation)
    meta.update(provenance_metadata(data_digest=data_digest, params_digest=params_digest, code_version=code_version,
                                    mlflow_run_id=mlflow_run_id, git_commit=git_commit, git_dirty=git_dirty))
    if zero_terminal_snr is not None:
        meta["tuneline.zero_terminal_snr"] = str(zero_terminal_snr).lower()
    for key, value in (extra or {}).items():
        meta[str(key)] = str(value)
    return meta


def kohya_metadata(
    *,
    title: str,
    rank: int | str,
    alpha: float | str,
    data_digest: str,
    params_digest: str,
    code_version: str,
    mlflow_run_id: str | None = None,
    git_commit: str = "unknown",
    git_dirty: bool | None = None,
    network_module: str = "networks.lora",
    network_args: Mapping[str, str] | None = None,
    network_dropout: float | None = None,
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
    resolution: tuple[int, int] = (1024, 1024),
    trigger_phrase: str | None = None,
    output_name: str | None = None,
    training_started_at: _dt.datetime | str | None = None,
    date: _dt.datetime | str | None = None,
    base_model_version: str = "sdxl_base_v1-0",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Header of a kohya-format SDXL LoRA: kohya's minimum `ss_*` set (network args included),
    `modelspec.*` 1.0.1 and provenance.

    `rank`/`alpha` are the network dim and alpha (pass "Dynamic" when they vary per module,
    as kohya does). `alpha` is the REAL alpha the LoRA was trained with, never the rank.
    """
    meta = {
        "ss_base_model_version": base_model_version,
        "ss_network_module": network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(dict(network_args or {})),
        "ss_output_name": output_name or title,
        "ss_v2": "False",
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_prediction_type": PREDICTION_TYPES.get(prediction_type, prediction_type),
        "ss_zero_terminal_snr": str(bool(zero_terminal_snr)),
    }
    if network_dropout is not None:
        meta["ss_network_dropout"] = str(network_dropout)
    if training_started_at is not None:
        started = training_started_at
        if isinstance(started, _dt.datetime):  # kohya stores a unix timestamp
            started = str(started.timestamp())
        meta["ss_training_started_at"] = str(started)
    meta.update(_common(
        architecture=f"{SDXL_ARCHITECTURE}/lora", title=title, data_digest=data_digest, params_digest=params_digest,
        code_version=code_version, mlflow_run_id=mlflow_run_id, git_commit=git_commit, git_dirty=git_dirty,
        prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr, resolution=resolution,
        trigger_phrase=trigger_phrase, date=date, extra=extra))
    return meta


def checkpoint_metadata(
    *,
    title: str,
    data_digest: str,
    params_digest: str,
    code_version: str,
    mlflow_run_id: str | None = None,
    git_commit: str = "unknown",
    git_dirty: bool | None = None,
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
    resolution: tuple[int, int] = (1024, 1024),
    trigger_phrase: str | None = None,
    date: _dt.datetime | str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Header of a full SDXL single-file checkpoint: `modelspec.*` 1.0.1 and provenance."""
    return _common(
        architecture=SDXL_ARCHITECTURE, title=title, data_digest=data_digest, params_digest=params_digest,
        code_version=code_version, mlflow_run_id=mlflow_run_id, git_commit=git_commit, git_dirty=git_dirty,
        prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr, resolution=resolution,
        trigger_phrase=trigger_phrase, date=date, extra=extra)


def vae_metadata(
    *,
    title: str,
    data_digest: str,
    params_digest: str,
    code_version: str,
    mlflow_run_id: str | None = None,
    git_commit: str = "unknown",
    git_dirty: bool | None = None,
    resolution: tuple[int, int] = (1024, 1024),
    description: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Header of a standalone SDXL VAE file: `modelspec.*` 1.0.1 with the architecture
    `stable-diffusion-xl-v1-base/vae` (the `<base>/<component>` form sd-scripts uses for its LoRA and
    ControlNet files), no prediction type, trigger phrase or date (the UNet's training says nothing
    of the VAE's), and the same provenance as the export's other files."""
    return _common(
        architecture=VAE_ARCHITECTURE, title=title, data_digest=data_digest, params_digest=params_digest,
        code_version=code_version, mlflow_run_id=mlflow_run_id, git_commit=git_commit, git_dirty=git_dirty,
        prediction_type=None, zero_terminal_snr=None, resolution=resolution, trigger_phrase=None, date=None,
        extra=extra, description=description)


def zimage_metadata(
    *,
    kind: str,
    title: str,
    data_digest: str,
    params_digest: str,
    code_version: str,
    mlflow_run_id: str | None = None,
    git_commit: str = "unknown",
    git_dirty: bool | None = None,
    resolution: tuple[int, int] = (1024, 1024),
    trigger_phrase: str | None = None,
    date: _dt.datetime | str | None = None,
    description: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Header of a Z-Image export (`kind`: checkpoint, lora or vae): `modelspec.*` 1.0.1 with the
    architecture `Z-Image` (`Z-Image/lora`, `Z-Image/vae`) and Z-Image's implementation, no prediction
    type (flow matching), the same provenance as the SDXL files, and `extra`."""
    suffix = {"checkpoint": "", "lora": "/lora", "vae": "/vae"}[kind]
    return _common(
        architecture=ZIMAGE_ARCHITECTURE + suffix, title=title, data_digest=data_digest, params_digest=params_digest,
        code_version=code_version, mlflow_run_id=mlflow_run_id, git_commit=git_commit, git_dirty=git_dirty,
        prediction_type=None, zero_terminal_snr=None, resolution=resolution,
        trigger_phrase=None if kind == "vae" else trigger_phrase, date=None if kind == "vae" else date,
        extra=extra, description=description, implementation=ZIMAGE_IMPLEMENTATION)
