"""Stage `export`: the trained result as single files other tools load, with a model card.

LoRA -> `<name>.safetensors` in kohya layout (ComfyUI, A1111, diffusers' load_lora_weights);
full fine-tune -> `<name>.safetensors` single-file SDXL checkpoint (original layout). Both
carry provenance in their header (data digest, params digest, code version, MLflow run),
so a file found in a UI folder can be traced back to its inputs.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

from tuneline import __version__
from tuneline.config import Params
from tuneline.core.params import ParamsError
from tuneline.core.fsutil import atomic_path, atomic_write_text, digest_json, link_or_copy, rebuilt_dir
from tuneline.models.ref import is_tiny
from tuneline.core.report import StageReport

STAGE = "export"
LORA_FILE = "pytorch_lora_weights.safetensors"


def _base_unet_config(params: Params, root: Path) -> Path:
    from tuneline.models.loading import _base_location

    base = _base_location(params.model, root)  # a single-file base: its converted folder
    if isinstance(base, str):
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(base, "unet/config.json", revision=params.model.revision))
    return base / "unet" / "config.json"


def _metadata_common(params: Params, state: dict[str, Any]) -> dict[str, Any]:
    triggers = [d.trigger_word for d in params.datasets if d.trigger_word]
    resolution = params.bucket.resolution
    return {
        "title": params.export.name,
        "data_digest": state["data_digest"],
        "params_digest": digest_json(params.model_dump(mode="json")),
        "code_version": __version__,
        "mlflow_run_id": state.get("mlflow_run_id"),
        "prediction_type": state.get("prediction_type", "epsilon"),
        "resolution": (resolution, resolution),
        "trigger_phrase": ", ".join(triggers) or None,
        "extra": {"tuneline.base_model": params.model.base, "tuneline.steps": str(state["step"]),
                  "tuneline.random_tiny_model": str(is_tiny(params.model.base)).lower(),
                  **({"modelspec.author": params.export.author} if params.export.author else {})},
    }


def _copy_atomically(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def model_card(params: Params, state: dict[str, Any], file_name: str, kind: str, samples: list[str]) -> str:
    train = params.train
    lines = [f"# {params.export.name}", ""]
    if is_tiny(params.model.base):
        lines += ["> **Random tiny model.** Trained from `tiny-sdxl`, a tiny model with RANDOM weights used for "
                  "tests and demos: this file proves the pipeline works, its images mean nothing.", ""]
    lines += [
        f"{kind} for SDXL, trained with tuneline {__version__}.", "",
        f"- file: `{file_name}`",
        f"- base model: `{params.model.base}`" + (f" @ `{params.model.revision}`" if params.model.revision else ""),
        "- trigger words: " + (", ".join(f"`{d.trigger_word}` ({d.name})" for d in params.datasets
                                         if d.trigger_word) or "none"),
        f"- steps: {state['step']} (epochs {state['epoch']}), seed {state['seed']}",
        f"- mode: {train.mode}" + (f", rank {train.lora.rank}, alpha {train.lora.alpha}, targets "
                                   f"{train.lora.targets}" if train.mode == "lora" else ""),
        f"- text encoders: 1 {train.text_encoder_1.mode}, 2 {train.text_encoder_2.mode}",
        f"- optimizer {train.optimizer.name}, lr {train.lr}, schedule {train.schedule.name}, "
        f"mixed precision {train.mixed_precision}",
        f"- prediction type: {state.get('prediction_type', 'epsilon')}, resolution {params.bucket.resolution}",
        f"- data digest: `{state['data_digest']}`" + (f", MLflow run `{state['mlflow_run_id']}`"
                                                      if state.get("mlflow_run_id") else ""),
        "",
    ]
    if samples:
        lines += ["## Samples", ""] + [f"![sample]({s})" for s in samples] + [""]
    lines += ["## Use", "", "ComfyUI / A1111: copy the file into `models/loras` (LoRA) or `models/checkpoints`.",
              "diffusers: `pipe.load_lora_weights(path)` or `StableDiffusionXLPipeline.from_single_file(path)`.", ""]
    return "\n".join(lines)


def run(params: Params, root: Path, trained_dir: Path, renders_dir: Path, out_dir: Path,
        metrics_dir: Path | None = None, *, tracker: Any = None) -> StageReport:
    from tuneline.stages.export.metadata import checkpoint_metadata, kohya_metadata
    from tuneline.stages.export.kohya_lora import export_kohya_lora
    from tuneline.stages.export.single_file import pipeline_to_single_file

    started = time.perf_counter()
    root, trained_dir = Path(root), Path(trained_dir)
    report = StageReport(STAGE)
    state_file = trained_dir / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: no trained model to export (run the train stage first)")
    state = json.loads(state_file.read_text("utf-8"))
    config = params.export
    common = _metadata_common(params, state)
    weights_dir = trained_dir / "ema" if config.use_ema and (trained_dir / "ema").is_dir() else trained_dir
    common["extra"]["tuneline.weights"] = "ema" if weights_dir != trained_dir else "trained"
    written: list[Path] = []
    with rebuilt_dir(out_dir) as staging:
        file_name = f"{config.name}.safetensors"
        if (weights_dir / LORA_FILE).is_file():
            lora = params.train.lora
            metadata = kohya_metadata(rank=lora.rank, alpha=lora.alpha, output_name=config.name,
                                      training_started_at=_dt.datetime.fromtimestamp(state["history"][0]["time"],
                                                                                     _dt.timezone.utc), **common)
            export_kohya_lora(weights_dir / LORA_FILE, staging / file_name, _base_unet_config(params, root), metadata)
            kind = "LoRA (kohya layout)"
        elif (weights_dir / "pipeline").is_dir():
            pipeline_to_single_file(weights_dir / "pipeline", staging / file_name, config.dtype,
                                    checkpoint_metadata(**common))
            kind = f"Full fine-tune (single-file SDXL checkpoint, {config.dtype})"
        else:
            raise ParamsError(f"{trained_dir}: neither {LORA_FILE} nor pipeline/ found")
        written.append(staging / file_name)
        if config.keep_diffusers:
            for path in trained_dir.rglob("*"):
                if path.is_file():
                    link_or_copy(path, staging / "diffusers" / path.relative_to(trained_dir))
        samples = []
        for image in sorted(Path(renders_dir).glob("final/*.png"))[:config.samples]:
            link_or_copy(image, staging / "samples" / image.name)
            samples.append(f"samples/{image.name}")
        atomic_write_text(staging / "README.md", model_card(params, state, file_name, kind, samples))
    final_file = Path(out_dir) / file_name
    for folder in config.copy_to:
        target = _copy_atomically(final_file, root / folder)
        report.extra.setdefault("copied_to", []).append(str(target))
    if tracker is not None:
        tracker.log_artifact(final_file, "export")
        tracker.log_artifact(Path(out_dir) / "README.md", "export")
    report.computed = 1
    report.extra.update({"file": str(final_file), "kind": kind, "bytes": final_file.stat().st_size})
    if is_tiny(params.model.base):
        report.warnings.append("exported a model trained from tiny-sdxl: RANDOM weights, for pipeline checks only")
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
    return report
