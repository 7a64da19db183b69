"""Stage `export`: the trained result as single files other tools load, with a model card.

What was trained decides the files (`<name>` is export.name); the trained family's exporter
(`Family.exporter`, the `Exporter` Protocol of tuneline.models.contracts) says which parts there are and
how each file is laid out, headed and written:

- LoRA only: `<name>.safetensors`, the LoRA in the layout the family's tools load.
- full only: `<name>.safetensors`, one single-file checkpoint (or diffusion model) of the fully trained parts.
- mixed (some parts full, some LoRA): `<name>.safetensors`, the checkpoint holding the fully
  trained parts (the other parts as in the base model), and `<name>_lora.safetensors`, the
  LoRA of the LoRA parts, meant at strength 1 on top of that checkpoint. The LoRA is not merged
  into the checkpoint: in an fp16/bf16 file the rounding would eat much of its update, and two
  files keep every trained tensor as it was trained (and the LoRA strength adjustable).
- with export.vae: also `<name>_vae.safetensors`, the pipeline's VAE (model.vae: models/autoencoder when
  the autoencoder stage ran; else the base's vae/) alone, in the layout of standalone VAE files.

Every file carries provenance in its header (data digest, params digest, code version with git
commit and dirty flag, MLflow run), so a file found in a UI folder can be traced back to its
inputs. The model card shows samples only when renders/ shows exactly the weights exported.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.config import Params
from tuneline.core import layout
from tuneline.core.fsutil import atomic_path, atomic_write_text, digest_json, link_or_copy, rebuilt_dir
from tuneline.core.report import StageReport
from tuneline.models.contracts import ExportedFile, HeaderFacts
from tuneline.models.ref import is_tiny
from tuneline.train.config import LoraConfig, TrainConfig

if TYPE_CHECKING:
    from tuneline.models.base import Family
    from tuneline.models.contracts import Exporter

STAGE = "export"


def run_record(root: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The training run's record (its MLflow runs and times), kept in its checkpoint folder, not in
    models/train: the same weights must be the same bytes whichever session last wrote them. {} when
    the folder is not here (models/train from a DVC remote, or an older run)."""
    path = Path(root) / layout.CHECKPOINTS / str(state.get("run_key")) / layout.TRAIN_RUN_RECORD
    try:
        return json.loads(path.read_text("utf-8")) if state.get("run_key") else {}
    except (OSError, ValueError):
        return {}


def header_facts(params: Params, state: dict[str, Any], trained: TrainConfig, record: dict[str, Any]) -> HeaderFacts:
    """What every file's header says of the run: the same in each file, the model card and MLflow."""
    from tuneline.stages.export.metadata import code_provenance

    triggers = [d.trigger_word for d in params.datasets if d.trigger_word]
    resolution = params.bucket.resolution
    trained_at = record.get("trained_at")
    first = record.get("started_at") or (state.get("history") or [{}])[0].get("time")
    return HeaderFacts(
        title=params.export.name,
        data_digest=state["data_digest"],
        params_digest=digest_json(params.model_dump(mode="json")),
        **code_provenance(),
        mlflow_run_id=record.get("mlflow_run_id") or state.get("mlflow_run_id"),
        # When the weights were made (not when they were exported): the same weights, the same header.
        date=_dt.datetime.fromtimestamp(trained_at, _dt.timezone.utc) if trained_at else None,
        prediction_type=state.get("prediction_type", "epsilon"),
        zero_terminal_snr=trained.zero_terminal_snr,
        resolution=(resolution, resolution),
        trigger_phrase=", ".join(triggers) or None,
        training_started_at=_dt.datetime.fromtimestamp(first, _dt.timezone.utc) if first else None,
    )


def _extra(params: Params, state: dict[str, Any], weights: str, file: ExportedFile,
           companion: ExportedFile | None) -> dict[str, str]:
    from tuneline.train.output import exported_step

    step, why = exported_step(state, params.export.weights)
    extra = {"tuneline.base_model": params.model.base, "tuneline.steps": str(state["step"]),
             "tuneline.exported_step": str(step), "tuneline.exported_weights": why,
             "tuneline.random_tiny_model": str(is_tiny(params.model.base)).lower(), "tuneline.weights": weights,
             "tuneline.trained_components": ",".join(file.components)}
    if companion is not None:  # mixed modes: neither file alone is the trained model
        extra["tuneline.companion_file"] = companion.name
    if params.export.author:
        extra["modelspec.author"] = params.export.author
    return extra


def _copy_atomically(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def provenance(facts: HeaderFacts) -> dict[str, str]:
    """The provenance entries, with the same keys and values in every file's header, the model card
    and the export's MLflow run."""
    from tuneline.models.export import provenance_metadata

    return provenance_metadata(**facts.provenance_args())


def _samples(renders_dir: Path, weights_dir: Path, root: Path, wanted: int,
             has_lora: bool) -> tuple[list[Path], str | None]:
    """The final renders to show in the card, or none and why: they must show the exported weights."""
    from tuneline.stages.render.generate import WEIGHTS_RECORD
    from tuneline.train.output import weights_identity

    final = Path(renders_dir) / "final"
    images = sorted(final.glob("*.png"))
    if wanted == 0:
        return [], None
    if not images:
        return [], f"no renders in {final} (run the render stage)"
    record = final / WEIGHTS_RECORD
    if not record.is_file():
        return [], f"{final} does not say which weights it shows (no {WEIGHTS_RECORD}): run the render stage"
    seen = json.loads(record.read_text("utf-8"))
    if seen.get("weights_identity") != weights_identity(weights_dir, root):
        return [], (f"{final} shows other weights than this export ships (an older training run, or "
                    f"render.use_ema differs from export.use_ema): run the render stage")
    if has_lora and seen.get("lora_scale") != 1.0:
        return [], (f"{final} was rendered at render.lora_scale {seen.get('lora_scale')}; the exported LoRA "
                    "is meant at strength 1")
    return images[:wanted], None


def _vae_file(params: Params, exporter: Exporter) -> tuple[ExportedFile, bool]:
    """The VAE file of export.vae, and whether its VAE is the base model's, unchanged.

    The pipeline's VAE is what every stage loads: model.vae, which the stage runner points at
    models/autoencoder when the autoencoder stage is enabled; unset, the base model's vae/."""
    config = params.export
    base_vae = not params.model.vae
    what = (f"the base model's VAE (`{params.model.base}` vae/), unchanged" if base_vae
            else f"the pipeline's VAE (`{params.model.vae}`)")
    return ExportedFile(f"{config.name}_vae.safetensors", "vae", [],
                        f"single-file VAE ({config.dtype}, {exporter.vae_layout}): {what}"), base_vae


def model_card(params: Params, state: dict[str, Any], trained: TrainConfig, files: list[ExportedFile],
               samples: list[str], samples_note: str | None, facts: HeaderFacts, family: Family,
               exporter: Exporter) -> str:
    from tuneline.train.output import exported_step

    lines = [f"# {params.export.name}", ""]
    if is_tiny(params.model.base):
        lines += [f"> **Random tiny model.** Trained from `{params.model.base}`, a tiny model with RANDOM weights "
                  "used for tests and demos: this file proves the pipeline works, its images mean nothing.", ""]
    lines += [f"Fine-tuned {family.title}, trained with tuneline {facts.code_version}.", "", "## Files", ""]
    lines += [f"- `{f.name}`: {f.description}" for f in files]
    models = [f for f in files if f.kind != "vae"]
    if len(models) > 1:
        lines += ["", f"Use both: load `{models[1].name}` at strength 1.0 on top of `{models[0].name}`. They were "
                  "trained together; either file alone is not the trained model."]
    prediction = state.get("prediction_type", "epsilon")
    lines += [
        "", "## Training", "",
        f"- base model: `{params.model.base}`" + (f" @ `{params.model.revision}`" if params.model.revision else ""),
        *([f"- training adapter: `{adapter.ref}` at scale {adapter.scale}, active in the training steps only and "
           "in none of these files: use them on the plain base model"] if (adapter := params.model.training_adapter)
          else []),
        "- trigger words: " + (", ".join(f"`{d.trigger_word}` ({d.name})" for d in params.datasets
                                         if d.trigger_word) or "none"),
        f"- steps: {state['step']} (epochs {state['epoch']}), seed {state['seed']}",
        f"- exported weights: {exported_step(state, params.export.weights)[1]}",
        *[exporter.component_line(name, mode, trained.lora) for name, mode in exporter.trained_modes(trained).items()],
        f"- optimizer {trained.optimizer.name}, lr {trained.lr}, schedule {trained.schedule.name}, "
        f"mixed precision {trained.mixed_precision}",
        exporter.card_training(prediction, trained, params.bucket.resolution),
        "",
        "## Provenance", "",
        "The same entries are in every file's header and on the export's MLflow run. The data digest names "
        "what was trained on (latents, captions, repeats, loss weights); the params digest, params.yaml.", "",
        *[f"- `{key}`: `{value}`" for key, value in provenance(facts).items() if value],
        "",
    ]
    if samples:
        lines += ["## Samples", ""] + [f"![sample]({s})" for s in samples] + [""]
    elif samples_note:
        lines += ["## Samples", "", f"None: {samples_note}.", ""]
    lines += exporter.card_use(files, prediction, trained)
    return "\n".join(lines + [""])


def _export_vae(params: Params, root: Path, file: ExportedFile, facts: HeaderFacts, base_vae: bool,
                store: Any, staging: Path, exporter: Exporter, lora: LoraConfig) -> int:
    """Put the VAE file into `staging`, from the store when the same VAE, dtype, header and code made it
    before (the VAE is read only on a miss). 1 when it was computed, 0 when reused."""
    from tuneline.core.codeversion import code_version
    from tuneline.models.loading import load_vae, vae_source
    from tuneline.stages.export import CODE

    config = params.export
    source = vae_source(params.model, root)
    extra = {"tuneline.base_model": params.model.base, "tuneline.vae": params.model.vae or "base",
             "tuneline.random_tiny_model": str(is_tiny(params.model.base)).lower()}
    if config.author:
        extra["modelspec.author"] = config.author
    description = "the base model's VAE, unchanged" if base_vae else f"the VAE of {params.model.vae}"
    metadata = exporter.header("vae", dataclasses.replace(facts, title=f"{config.name} VAE"), extra,
                               file_name=file.name, lora=lora, description=description)
    stored = store.path(digest_json({"vae": source.identity(root), "dtype": config.dtype, "code": code_version(CODE),
                                     "file": [file.name, file.kind], "metadata": metadata}), ".safetensors")
    computed = 0
    if not stored.is_file():
        vae = load_vae(params.model, root, dtype="fp32", device="cpu")  # exact: every stored dtype fits in fp32
        exporter.write_vae(vae.state_dict(), dict(vae.config), stored, config.dtype, metadata)
        computed = 1
    link_or_copy(stored, staging / file.name)
    return computed


def _log_mlflow_card(tracker: Any, out_dir: Path) -> None:
    """The card as export/model_card.html with its samples inlined: MLflow's preview of README.md
    shows no images (see stages/export/metadata.py)."""
    import tempfile

    from tuneline.stages.export.metadata import MLFLOW_CARD, card_html

    if not tracker.active:
        return
    images = {f"samples/{image.name}": image for image in sorted((out_dir / "samples").glob("*.png"))}
    with tempfile.TemporaryDirectory() as folder:
        card = Path(folder) / MLFLOW_CARD
        card.write_text(card_html((out_dir / "README.md").read_text("utf-8"), images), "utf-8")
        tracker.log_artifact(card, "export")


def run(params: Params, root: Path, trained_dir: Path, renders_dir: Path, out_dir: Path,
        metrics_dir: Path | None = None, *, tracker: Any = None) -> StageReport:
    from tuneline.core.codeversion import code_version
    from tuneline.core.store import ItemStore
    from tuneline.models.ref import identify
    from tuneline.stages.export import CODE
    from tuneline.train.output import (
        LORA_FILE,
        PIPELINE_DIR,
        TRAINER_STATE,
        choose_weights,
        read_trainer_state,
        trained_family,
        weights_identity,
    )

    started = time.perf_counter()
    root, trained_dir = Path(root), Path(trained_dir)
    report = StageReport(STAGE, metric_keys=("items", "bytes"))
    state = read_trainer_state(trained_dir)
    if not state:
        raise FileNotFoundError(f"{trained_dir / TRAINER_STATE}: no trained model to export (run the train stage "
                                "first)")
    trained = TrainConfig.model_validate(state["train_config"])  # what was trained, not today's params.yaml
    family = trained_family(state, params.model, root)  # what was trained decides the layout
    exporter = family.build_exporter()
    config = params.export
    weights_dir = choose_weights(trained_dir, config.use_ema, None, config.weights, "export.weights")
    weights = "best" if config.weights == "best" else "ema" if weights_dir != trained_dir else "trained"
    modes = exporter.trained_modes(trained)
    full = [name for name, mode in modes.items() if mode == "full"]
    lora = [name for name, mode in modes.items() if mode == "lora"]
    for parts, found in ((full, weights_dir / PIPELINE_DIR), (lora, weights_dir / LORA_FILE)):
        if parts and not found.exists():
            raise FileNotFoundError(f"{found} is missing: the run trained {exporter.names(parts)} ({modes})")

    files: list[ExportedFile] = []
    if full:
        untouched = [name for name in modes if name not in full]
        files.append(ExportedFile(f"{config.name}.safetensors", "checkpoint", full,
                                  exporter.checkpoint_description(full, untouched, config.dtype)))
    if lora:
        lora_settings = trained.lora
        files.append(ExportedFile(
            f"{config.name}{'_lora' if full else ''}.safetensors", "lora", lora,
            f"{exporter.lora_kind(lora_settings)} of the {exporter.names(lora)} (rank {lora_settings.rank}, "
            f"alpha {lora_settings.alpha})" + (f", to apply at strength 1.0 on top of `{files[0].name}`" if full else "")))
    base_vae = False
    if config.vae:
        vae_file, base_vae = _vae_file(params, exporter)
        files.append(vae_file)
        if base_vae:
            report.warnings.append("export: export.vae is on but the VAE is the base model's, unchanged: model.vae "
                                   "is unset (the autoencoder stage, when enabled, sets it to models/autoencoder)")
    record = run_record(root, state)
    facts = header_facts(params, state, trained, record)
    samples, samples_note = _samples(Path(renders_dir), weights_dir, root, config.samples, bool(lora))
    if samples_note and config.samples:
        report.warnings.append(f"export: no samples in the model card: {samples_note}")
    # Each exported file is cached in the item store by what decides its bytes: the weights' content,
    # the base model (kohya block names come from its UNet config), the header, dtype and code. A
    # rerun of the same inputs (DVC after the flow, or the other way round) writes nothing again.
    store = ItemStore(root / params.store_dir, STAGE)
    identity = {"family": family.name, "weights": weights_identity(weights_dir, root), "dtype": config.dtype,
                "code": code_version(CODE),
                "base": {key: entry["identity"] for key, entry in identify(params, root, ("model.base",)).items()}}
    made = 0
    with rebuilt_dir(out_dir) as staging:
        for file in files:
            if file.kind == "vae":
                made += _export_vae(params, root, file, facts, base_vae, store, staging, exporter, trained.lora)
                continue
            companion = next((other for other in files if other is not file and other.kind != "vae"), None)
            extra = _extra(params, state, weights, file, companion)
            metadata = exporter.header(file.kind, facts, extra, file_name=file.name, lora=trained.lora)
            stored = store.path(digest_json({**identity, "file": [file.name, file.kind, file.components],
                                             "metadata": metadata}), ".safetensors")
            if not stored.is_file():
                made += 1
                if file.kind == "checkpoint":
                    exporter.write_checkpoint(weights_dir / PIPELINE_DIR, stored, config.dtype, metadata)
                else:
                    exporter.write_lora(weights_dir / LORA_FILE, stored, metadata, params.model, root)
            link_or_copy(stored, staging / file.name)
        if config.keep_diffusers:
            for path in trained_dir.rglob("*"):
                if path.is_file():
                    link_or_copy(path, staging / "diffusers" / path.relative_to(trained_dir))
        for image in samples:
            link_or_copy(image, staging / "samples" / image.name)
        atomic_write_text(staging / "README.md", model_card(
            params, state, trained, files, [f"samples/{image.name}" for image in samples], samples_note,
            facts, family, exporter))
    paths = [Path(out_dir) / file.name for file in files]
    for folder in config.copy_to:  # a folder of checkpoints or LoRAs: the VAE file has its own (models/vae)
        for path in [Path(out_dir) / file.name for file in files if file.kind != "vae"]:
            report.extra.setdefault("copied_to", []).append(str(_copy_atomically(path, root / folder)))
    if tracker is not None:
        tracker.set_tags(provenance(facts))
        for path in [*paths, Path(out_dir) / "README.md"]:
            tracker.log_artifact(path, "export")
        for image in sorted((Path(out_dir) / "samples").glob("*.png")):  # the card shows them
            tracker.log_artifact(image, "export/samples")
        _log_mlflow_card(tracker, Path(out_dir))
    report.computed, report.reused = made, len(paths) - made
    report.extra.update({"file": str(paths[0]), "files": [str(p) for p in paths],
                         "kind": "; ".join(f"{f.name}: {f.description}" for f in files),
                         "bytes": sum(p.stat().st_size for p in paths), "samples": len(samples),
                         "family": family.name})
    if is_tiny(params.model.base):
        report.warnings.append(f"exported a model trained from {params.model.base}: RANDOM weights, for pipeline "
                               "checks only")
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
    return report
