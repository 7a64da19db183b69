"""Stage `export`: the trained result as single files other tools load, with a model card.

What was trained decides the files (`<name>` is export.name):

- LoRA only (UNet and/or text encoders): `<name>.safetensors`, a kohya LoRA (ComfyUI, A1111,
  diffusers' load_lora_weights; a DoRA carries LyCORIS' `dora_scale`).
- full only: `<name>.safetensors`, one single-file SDXL checkpoint (original layout).
- mixed (some parts full, some LoRA): `<name>.safetensors`, the checkpoint holding the fully
  trained parts (the other parts as in the base model), and `<name>_lora.safetensors`, the kohya
  LoRA of the LoRA parts, meant at strength 1 on top of that checkpoint. The LoRA is not merged
  into the checkpoint: in an fp16/bf16 file the rounding would eat much of its update, and two
  files keep every trained tensor as it was trained (and the LoRA strength adjustable).
- Z-Image (trainer_state.json's family): the LoRA as `diffusion_model.<module>.lora_A/lora_B/alpha`
  (ComfyUI's Z-Image LoRA keys; diffusers' ZImagePipeline.load_lora_weights reads it), the full
  fine-tune as the transformer alone in ComfyUI's Z-Image layout (models/diffusion_models); see
  `zimage.py` for what was checked against ComfyUI.
- with export.vae: also `<name>_vae.safetensors`, the pipeline's VAE (model.vae: models/autoencoder when
  the autoencoder stage ran; else the base's vae/) alone, in the ldm layout of standalone VAE files
  (ComfyUI's Load VAE, A1111's models/VAE).

Every file carries provenance in its header (data digest, params digest, code version with git
commit and dirty flag, MLflow run), so a file found in a UI folder can be traced back to its
inputs. The model card shows samples only when renders/ shows exactly the weights exported.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.config import Params
from tuneline.core import layout
from tuneline.core.fsutil import atomic_path, atomic_write_text, digest_json, link_or_copy, rebuilt_dir
from tuneline.core.report import StageReport
from tuneline.models.ref import is_tiny
from tuneline.train.config import TrainConfig

STAGE = "export"
COMPONENTS = {"unet": "UNet", "text_encoder_1": "text encoder 1 (CLIP ViT-L)",
              "text_encoder_2": "text encoder 2 (OpenCLIP bigG)", "transformer": "transformer (Z-Image DiT)"}
FAMILY_TITLES = {"sdxl": "SDXL", "zimage": "Z-Image"}


@dataclass
class ExportedFile:
    """One file of the export: its name, what it is, and which trained components it carries."""

    name: str
    kind: str  # "checkpoint", "lora" or "vae"
    components: list[str]
    description: str


def _base_unet_config(params: Params, root: Path) -> Path:
    from tuneline.models.loading import _base_location

    base = _base_location(params.model, root)  # a single-file base: its converted folder
    if isinstance(base, str):
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(base, "unet/config.json", revision=params.model.revision))
    return base / "unet" / "config.json"


def trained_modes(trained: TrainConfig, family: str = "sdxl") -> dict[str, str]:
    """unet / text_encoder_1 / text_encoder_2 (Z-Image: transformer) -> frozen, lora or full, as the run
    trained them. A Z-Image run that trained its Qwen3 text encoder has no export (ValueError)."""
    if family == "zimage":
        if trained.text_encoder_1.mode != "frozen" or trained.text_encoder_2.mode != "frozen":
            raise ValueError("export: this Z-Image run trained its text encoder; only the transformer (LoRA or "
                             "full) exports for Z-Image so far")
        return {"transformer": trained.mode}
    return {"unet": trained.mode, "text_encoder_1": trained.text_encoder_1.mode,
            "text_encoder_2": trained.text_encoder_2.mode}


def _names(parts: list[str]) -> str:
    return " and ".join(COMPONENTS[p] for p in parts)


def run_record(root: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The training run's record (its MLflow runs and times), kept in its checkpoint folder, not in
    models/train: the same weights must be the same bytes whichever session last wrote them. {} when
    the folder is not here (models/train from a DVC remote, or an older run)."""
    path = Path(root) / layout.CHECKPOINTS / str(state.get("run_key")) / layout.TRAIN_RUN_RECORD
    try:
        return json.loads(path.read_text("utf-8")) if state.get("run_key") else {}
    except (OSError, ValueError):
        return {}


def _metadata_common(params: Params, state: dict[str, Any], trained: TrainConfig,
                     record: dict[str, Any]) -> dict[str, Any]:
    from tuneline.stages.export.metadata import code_provenance

    triggers = [d.trigger_word for d in params.datasets if d.trigger_word]
    resolution = params.bucket.resolution
    trained_at = record.get("trained_at")
    return {
        "title": params.export.name,
        "data_digest": state["data_digest"],
        "params_digest": digest_json(params.model_dump(mode="json")),
        **code_provenance(),
        "mlflow_run_id": record.get("mlflow_run_id") or state.get("mlflow_run_id"),
        # When the weights were made (not when they were exported): the same weights, the same header.
        "date": _dt.datetime.fromtimestamp(trained_at, _dt.timezone.utc) if trained_at else None,
        "prediction_type": state.get("prediction_type", "epsilon"),
        "zero_terminal_snr": trained.zero_terminal_snr,
        "resolution": (resolution, resolution),
        "trigger_phrase": ", ".join(triggers) or None,
    }


def _extra(params: Params, state: dict[str, Any], weights: str, file: ExportedFile,
           companion: ExportedFile | None) -> dict[str, str]:
    extra = {"tuneline.base_model": params.model.base, "tuneline.steps": str(state["step"]),
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


def _samples(renders_dir: Path, weights_dir: Path, root: Path, wanted: int,
             has_lora: bool) -> tuple[list[Path], str | None]:
    """The final renders to show in the card, or none and why: they must show the exported weights."""
    from tuneline.stages.render.generate import WEIGHTS_RECORD, weights_identity

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


def _component_line(name: str, mode: str, trained: TrainConfig) -> str:
    if mode != "lora":
        return f"- {COMPONENTS[name]}: {mode}"
    lora = trained.lora
    return (f"- {COMPONENTS[name]}: {'DoRA' if lora.use_dora else 'LoRA'} rank {lora.rank}, alpha {lora.alpha}"
            + (f", targets {lora.targets}" if name == "unet" else ""))


def provenance(common: dict[str, Any]) -> dict[str, str]:
    """The provenance entries, with the same keys and values in every file's header, the model card
    and the export's MLflow run."""
    from tuneline.stages.export.metadata import provenance_metadata

    return provenance_metadata(**{key: common[key] for key in PROVENANCE_KEYS})


PROVENANCE_KEYS = ("data_digest", "params_digest", "code_version", "mlflow_run_id", "git_commit", "git_dirty")


def _zimage_header(kind: str, common: dict[str, Any], extra: dict[str, str], description: str | None = None,
                   title: str | None = None) -> dict[str, str]:
    from tuneline.stages.export.metadata import zimage_metadata

    return zimage_metadata(kind=kind, title=title or common["title"], resolution=common["resolution"],
                           trigger_phrase=common["trigger_phrase"], date=common["date"], description=description,
                           extra=extra, **{key: common[key] for key in PROVENANCE_KEYS})


def _vae_file(params: Params, root: Path, family: str = "sdxl") -> tuple[ExportedFile, bool]:
    """The VAE file of export.vae, and whether its VAE is the base model's, unchanged.

    The pipeline's VAE is what every stage loads: model.vae, which the stage runner points at
    models/autoencoder when the autoencoder stage is enabled; unset, the base model's vae/."""
    config = params.export
    base_vae = not params.model.vae
    what = (f"the base model's VAE (`{params.model.base}` vae/), unchanged" if base_vae
            else f"the pipeline's VAE (`{params.model.vae}`)")
    layout_note = ("the 16-channel Flux/Z-Image VAE in the layout of its `ae.safetensors`: ComfyUI `models/vae`"
                   if family == "zimage" else "original layout: ComfyUI `models/vae`, A1111 `models/VAE`")
    return ExportedFile(f"{config.name}_vae.safetensors", "vae", [],
                        f"single-file VAE ({config.dtype}, {layout_note}): {what}"), base_vae


def model_card(params: Params, state: dict[str, Any], trained: TrainConfig, files: list[ExportedFile],
               samples: list[str], samples_note: str | None, common: dict[str, Any], family: str = "sdxl") -> str:
    code_version = common["code_version"]
    lines = [f"# {params.export.name}", ""]
    if is_tiny(params.model.base):
        lines += [f"> **Random tiny model.** Trained from `{params.model.base}`, a tiny model with RANDOM weights "
                  "used for tests and demos: this file proves the pipeline works, its images mean nothing.", ""]
    lines += [f"Fine-tuned {FAMILY_TITLES[family]}, trained with tuneline {code_version}.", "", "## Files", ""]
    lines += [f"- `{f.name}`: {f.description}" for f in files]
    models = [f for f in files if f.kind != "vae"]
    if len(models) > 1:
        lines += ["", f"Use both: load `{models[1].name}` at strength 1.0 on top of `{models[0].name}`. They were "
                  "trained together; either file alone is not the trained model."]
    prediction = state.get("prediction_type", "epsilon")
    lines += [
        "", "## Training", "",
        f"- base model: `{params.model.base}`" + (f" @ `{params.model.revision}`" if params.model.revision else ""),
        "- trigger words: " + (", ".join(f"`{d.trigger_word}` ({d.name})" for d in params.datasets
                                         if d.trigger_word) or "none"),
        f"- steps: {state['step']} (epochs {state['epoch']}), seed {state['seed']}",
        *[_component_line(name, mode, trained) for name, mode in trained_modes(trained, family).items()],
        f"- optimizer {trained.optimizer.name}, lr {trained.lr}, schedule {trained.schedule.name}, "
        f"mixed precision {trained.mixed_precision}",
        (f"- flow matching (velocity noise - x0), resolution {params.bucket.resolution}" if family == "zimage" else
         f"- prediction type: {prediction}, zero terminal SNR: {'yes' if trained.zero_terminal_snr else 'no'}, "
         f"resolution {params.bucket.resolution}"),
        "",
        "## Provenance", "",
        "The same entries are in every file's header and on the export's MLflow run. The data digest names "
        "what was trained on (latents, captions, repeats, loss weights); the params digest, params.yaml.", "",
        *[f"- `{key}`: `{value}`" for key, value in provenance(common).items() if value],
        "",
    ]
    if samples:
        lines += ["## Samples", ""] + [f"![sample]({s})" for s in samples] + [""]
    elif samples_note:
        lines += ["## Samples", "", f"None: {samples_note}.", ""]
    if family == "zimage":
        lines += ["## Use", "", "ComfyUI: the diffusion model goes into `models/diffusion_models` (Load Diffusion Model; "
                  "the Qwen3 text encoder and the VAE are separate files, CLIP type `lumina2`), LoRAs into "
                  "`models/loras`" + (", the VAE into `models/vae`." if any(f.kind == "vae" for f in files) else "."),
                  "diffusers: `ZImagePipeline.from_pretrained(base)` then `pipe.load_lora_weights(path)`; a full "
                  "fine-tune: the `diffusers/pipeline` folder (`ZImagePipeline.from_pretrained`).",
                  "Guidance follows ZImagePipeline's convention: 0 turns it off; g > 0 gives pos + g*(pos - neg)."]
        return "\n".join(lines + [""])
    lines += ["## Use", "", "ComfyUI / A1111: checkpoints go into `models/checkpoints`, LoRAs into `models/loras`"
              + (", the VAE into `models/vae` (ComfyUI's Load VAE node; A1111: `models/VAE`)."
                 if any(f.kind == "vae" for f in files) else "."),
              "diffusers: `StableDiffusionXLPipeline.from_single_file(path, config=...)`, `pipe.load_lora_weights(path)`."]
    if prediction == "v_prediction" or trained.zero_terminal_snr:
        lines += ["The checkpoint carries the `v_pred` / `ztsnr` keys ComfyUI reads. diffusers' single-file loader "
                  "ignores them: pass `config=` the exported `diffusers/pipeline` folder, whose scheduler has the "
                  "trained prediction type and zero-terminal-SNR setting."]
    return "\n".join(lines + [""])


def _export_vae(params: Params, root: Path, file: ExportedFile, common: dict[str, Any], base_vae: bool,
                store: Any, staging: Path, family: str = "sdxl") -> int:
    """Put the VAE file into `staging`, from the store when the same VAE, dtype, header and code made it
    before (the VAE is read only on a miss). 1 when it was computed, 0 when reused."""
    from tuneline.core.codeversion import code_version
    from tuneline.models.loading import load_vae, vae_source
    from tuneline.stages.export import CODE
    from tuneline.stages.export.metadata import vae_metadata
    from tuneline.models.sdxl.checkpoint_file import vae_to_single_file

    config = params.export
    source = vae_source(params.model, root)
    extra = {"tuneline.base_model": params.model.base, "tuneline.vae": params.model.vae or "base",
             "tuneline.random_tiny_model": str(is_tiny(params.model.base)).lower()}
    if config.author:
        extra["modelspec.author"] = config.author
    description = "the base model's VAE, unchanged" if base_vae else f"the VAE of {params.model.vae}"
    if family == "zimage":
        metadata = _zimage_header("vae", common, extra, description, title=f"{config.name} VAE")
    else:
        metadata = vae_metadata(title=f"{config.name} VAE", resolution=common["resolution"], extra=extra,
                                description=description, **{key: common[key] for key in PROVENANCE_KEYS})
    stored = store.path(digest_json({"vae": source.identity(root), "dtype": config.dtype, "code": code_version(CODE),
                                     "file": [file.name, file.kind], "metadata": metadata}), ".safetensors")
    computed = 0
    if not stored.is_file():
        vae = load_vae(params.model, root, dtype="fp32", device="cpu")  # exact: every stored dtype fits in fp32
        vae_to_single_file(vae.state_dict(), dict(vae.config), stored, config.dtype, metadata)
        computed = 1
    link_or_copy(stored, staging / file.name)
    return computed


def run(params: Params, root: Path, trained_dir: Path, renders_dir: Path, out_dir: Path,
        metrics_dir: Path | None = None, *, tracker: Any = None) -> StageReport:
    from tuneline.models.sdxl.kohya_lora import export_kohya_lora
    from tuneline.stages.export.metadata import checkpoint_metadata, kohya_metadata, lora_network
    from tuneline.models.sdxl.checkpoint_file import pipeline_to_single_file
    from tuneline.core.codeversion import code_version
    from tuneline.core.store import ItemStore
    from tuneline.models.ref import identify
    from tuneline.stages.export import CODE
    from tuneline.stages.render.generate import LORA_FILE, PIPELINE_DIR, weights_identity
    from tuneline.models.zimage.export import export_zimage_lora, transformer_to_single_file
    from tuneline.models.family import detect_family

    started = time.perf_counter()
    root, trained_dir = Path(root), Path(trained_dir)
    report = StageReport(STAGE, metric_keys=("items", "bytes"))
    state_file = trained_dir / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: no trained model to export (run the train stage first)")
    state = json.loads(state_file.read_text("utf-8"))
    trained = TrainConfig.model_validate(state["train_config"])  # what was trained, not today's params.yaml
    family = state.get("family") or detect_family(params.model, root)  # what was trained decides the layout
    config = params.export
    weights_dir = trained_dir / "ema" if config.use_ema and (trained_dir / "ema").is_dir() else trained_dir
    weights = "ema" if weights_dir != trained_dir else "trained"
    modes = trained_modes(trained, family)
    full = [name for name, mode in modes.items() if mode == "full"]
    lora = [name for name, mode in modes.items() if mode == "lora"]
    for parts, found in ((full, weights_dir / PIPELINE_DIR), (lora, weights_dir / LORA_FILE)):
        if parts and not found.exists():
            raise FileNotFoundError(f"{found} is missing: the run trained {_names(parts)} ({modes})")

    files: list[ExportedFile] = []
    if full:
        untouched = [name for name in modes if name not in full]
        files.append(ExportedFile(
            f"{config.name}.safetensors", "checkpoint", full,
            f"single-file Z-Image diffusion model ({config.dtype}): the fully trained transformer alone in "
            "ComfyUI's Z-Image layout (models/diffusion_models)" if family == "zimage" else
            f"single-file SDXL checkpoint ({config.dtype}) with the fully trained {_names(full)}"
            + (f"; {_names(untouched)} as in the base model" if untouched else "")))
    if lora:
        lora_settings = trained.lora
        kind = ("Z-Image LoRA (`diffusion_model.` keys: ComfyUI, diffusers' load_lora_weights)" if family == "zimage"
                else f"kohya {'DoRA' if lora_settings.use_dora else 'LoRA'}")
        files.append(ExportedFile(
            f"{config.name}{'_lora' if full else ''}.safetensors", "lora", lora,
            f"{kind} of the {_names(lora)} (rank {lora_settings.rank}, "
            f"alpha {lora_settings.alpha})" + (f", to apply at strength 1.0 on top of `{files[0].name}`" if full else "")))
    base_vae = False
    if config.vae:
        vae_file, base_vae = _vae_file(params, root, family)
        files.append(vae_file)
        if base_vae:
            report.warnings.append("export: export.vae is on but the VAE is the base model's, unchanged: model.vae "
                                   "is unset (the autoencoder stage, when enabled, sets it to models/autoencoder)")
    record = run_record(root, state)
    common = _metadata_common(params, state, trained, record)
    samples, samples_note = _samples(Path(renders_dir), weights_dir, root, config.samples, bool(lora))
    if samples_note and config.samples:
        report.warnings.append(f"export: no samples in the model card: {samples_note}")
    # Each exported file is cached in the item store by what decides its bytes: the weights' content,
    # the base model (kohya block names come from its UNet config), the header, dtype and code. A
    # rerun of the same inputs (DVC after the flow, or the other way round) writes nothing again.
    store = ItemStore(root / params.store_dir, STAGE)
    identity = {"family": family, "weights": weights_identity(weights_dir, root), "dtype": config.dtype,
                "code": code_version(CODE),
                "base": {key: entry["identity"] for key, entry in identify(params, root, ("model.base",)).items()}}
    made = 0
    with rebuilt_dir(out_dir) as staging:
        for file in files:
            if file.kind == "vae":
                made += _export_vae(params, root, file, common, base_vae, store, staging, family)
                continue
            companion = next((other for other in files if other is not file and other.kind != "vae"), None)
            extra = _extra(params, state, weights, file, companion)
            if family == "zimage":
                metadata = _zimage_header(file.kind, common, extra)
            elif file.kind == "checkpoint":
                metadata = checkpoint_metadata(**common, extra=extra)
            else:
                module, network_args = lora_network(trained.lora)
                first = record.get("started_at") or (state.get("history") or [{}])[0].get("time")
                started_at = _dt.datetime.fromtimestamp(first, _dt.timezone.utc) if first else None
                metadata = kohya_metadata(rank=trained.lora.rank, alpha=trained.lora.alpha, network_module=module,
                                          network_args=network_args, network_dropout=trained.lora.dropout,
                                          output_name=Path(file.name).stem, training_started_at=started_at,
                                          **common, extra=extra)
            stored = store.path(digest_json({**identity, "file": [file.name, file.kind, file.components],
                                             "metadata": metadata}), ".safetensors")
            if not stored.is_file():
                made += 1
                if family == "zimage" and file.kind == "checkpoint":
                    transformer_to_single_file(weights_dir / PIPELINE_DIR / "transformer", stored, config.dtype,
                                               metadata)
                elif family == "zimage":
                    export_zimage_lora(weights_dir / LORA_FILE, stored, metadata)
                elif file.kind == "checkpoint":
                    pipeline_to_single_file(weights_dir / PIPELINE_DIR, stored, config.dtype, metadata)
                else:
                    export_kohya_lora(weights_dir / LORA_FILE, stored, _base_unet_config(params, root), metadata)
            link_or_copy(stored, staging / file.name)
        if config.keep_diffusers:
            for path in trained_dir.rglob("*"):
                if path.is_file():
                    link_or_copy(path, staging / "diffusers" / path.relative_to(trained_dir))
        for image in samples:
            link_or_copy(image, staging / "samples" / image.name)
        atomic_write_text(staging / "README.md", model_card(
            params, state, trained, files, [f"samples/{image.name}" for image in samples], samples_note,
            common, family))
    paths = [Path(out_dir) / file.name for file in files]
    for folder in config.copy_to:  # a folder of checkpoints or LoRAs: the VAE file has its own (models/vae)
        for path in [Path(out_dir) / file.name for file in files if file.kind != "vae"]:
            report.extra.setdefault("copied_to", []).append(str(_copy_atomically(path, root / folder)))
    if tracker is not None:
        tracker.set_tags(provenance(common))
        for path in [*paths, Path(out_dir) / "README.md"]:
            tracker.log_artifact(path, "export")
        for image in sorted((Path(out_dir) / "samples").glob("*.png")):  # the card shows them
            tracker.log_artifact(image, "export/samples")
    report.computed, report.reused = made, len(paths) - made
    report.extra.update({"file": str(paths[0]), "files": [str(p) for p in paths],
                         "kind": "; ".join(f"{f.name}: {f.description}" for f in files),
                         "bytes": sum(p.stat().st_size for p in paths), "samples": len(samples),
                         "family": family})
    if is_tiny(params.model.base):
        report.warnings.append(f"exported a model trained from {params.model.base}: RANDOM weights, for pipeline "
                               "checks only")
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
    return report
