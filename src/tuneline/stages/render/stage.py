"""Stage `render`: the base and the trained model on the same prompts and seeds, and sheets.

Writes into the output folder (renders/):
  base/<i>.png, final/<i>.png     every prompt, base and trained, same seeds
  contact_sheet.png               prompts x (base, each live/step_N found, final)
  transfer/<a>_to_<b>.png         two or more data sets: img2img into the other trigger word
  diagnostics.png                 x_t / x0 prediction / cross-attention of training samples
  autoencoder/<data set>.png      with the autoencoder stage on: its reconstruction sheets
                                  (input | base VAE | trained VAE), beside the contact sheet
and metrics/render.json. live/ (written during training) is read, never removed. Every image
(the transfer images and the diagnostic sheet too) is cached in the item store by the weights'
content and what else decides its pixels: a rerun with unchanged weights loads no model.

The prompts come as the embeddings the latents stage cached (data/prompt_embeds; the diagnostic
sheet's captions from data/latents): then no text encoder is loaded and the images are those the
text encoders would give. When a text is not cached, or the run trained a text encoder, the text
encoders encode them as before (one warning when a cache was expected). The report says which
(`prompt_embeddings`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.config import Params
from tuneline.core import layout
from tuneline.core.fsutil import atomic_write_json, file_digest, link_or_copy, relative_to_root
from tuneline.models.ref import is_tiny
from tuneline.core.parallel import counted, progress_bar
from tuneline.core.report import StageReport, console

if TYPE_CHECKING:
    from tuneline.models.variant import VariantChoice

STAGE = "render"
LATENTS_DIR = "data/latents"
CAPTIONED_DIR = "data/captioned"


def _log_images(tracker: Any, paths: list[Path], out_dir: Path) -> None:
    if tracker is None:
        return
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            tracker.log_image(image.copy(), f"render/{path.relative_to(out_dir).as_posix()}")


def _mean_abs_difference(a: list[Path], b: list[Path]) -> float:
    import numpy as np
    from PIL import Image

    diffs = []
    for x, y in zip(a, b):
        with Image.open(x) as first, Image.open(y) as second:
            diffs.append(np.abs(np.asarray(first, dtype=np.float32) - np.asarray(second, dtype=np.float32)).mean())
    return float(np.mean(diffs)) if diffs else 0.0


def autoencoder_sheets(params: Params, root: Path, out_dir: Path) -> list[Path]:
    """The autoencoder stage's reconstruction sheets, linked into renders/autoencoder/ (none when it is off)."""
    folder = Path(out_dir) / "autoencoder"
    shutil.rmtree(folder, ignore_errors=True)
    source = Path(root) / layout.AUTOENCODER / "sheets"
    if not params.autoencoder.enabled or not source.is_dir():
        return []
    placed = []
    for sheet in sorted(source.glob("*.png")):
        link_or_copy(sheet, folder / sheet.name)
        placed.append(folder / sheet.name)
    return placed


def render_defaults(variant: VariantChoice, config: Any) -> dict[str, Any]:
    """The report's account of the steps and guidance a prompt that sets neither gets, and where they come from."""
    origin = f"variant {variant.variant.name}: {variant.variant.source or 'the family defaults'}"
    return {"variant": variant.variant.name, "variant_decided_by": variant.reason,
            "default_steps": config.steps if config.steps is not None else variant.steps,
            "default_guidance_scale": config.guidance_scale if config.guidance_scale is not None
            else variant.guidance_scale,
            "defaults_from": f"steps: {'render.steps' if config.steps is not None else origin}; guidance_scale: "
                             f"{'render.guidance_scale' if config.guidance_scale is not None else origin}"}


def run(params: Params, root: Path, trained_dir: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None) -> StageReport:
    """Render base and trained images, the contact sheet, domain transfer and the diagnostic sheet."""
    from tuneline.models.loading import release, resolve_device, resolve_dtype
    from tuneline.models.ref import identify
    from tuneline.models.quantize import cache_key_fields
    from tuneline.models.variant import resolve_variant
    from tuneline.stages.render.cache import ImageCache
    from tuneline.stages.render.embeds import render_prompt_embeddings
    from tuneline.stages.render.generate import WEIGHTS_RECORD, apply_trained, load_base_pipeline, render_prompts
    from tuneline.stages.render.prompts import load_prompts
    from tuneline.stages.render.sheets import contact_sheet, diagnostic_sheet, live_steps
    from tuneline.stages.render.transfer import render_transfer, transfer_jobs, transfer_sources, transfer_steps
    from tuneline.train.output import (
        LIVE_DIR,
        choose_weights,
        read_trainer_state,
        trained_family,
        weights_identity,
    )

    started = time.perf_counter()
    root, trained_dir, out_dir = Path(root), Path(trained_dir), Path(out_dir)
    config = params.render
    if not trained_dir.is_dir():
        raise FileNotFoundError(f"{trained_dir} does not exist: run stage train first")
    # What was trained decides the pipelines (trainer_state.json's family), else model.base's family.
    state = read_trainer_state(trained_dir)
    family = trained_family(state, params.model, root)
    facts = family.render
    variant = resolve_variant(params.model, family, root)  # model.base's release: its steps and guidance when unset
    prompts = load_prompts(root / config.prompts_file, config, family,
                           variant.variant)  # a bad file stops before any model loads
    report = StageReport(STAGE, metric_keys=("items", "mean_abs_diff_vs_base"))
    tiny = is_tiny(params.model.base) or bool(state.get("random_tiny_model"))
    if tiny:
        report.warnings.append(f"model.base is {params.model.base!r}: a tiny RANDOM-weight model, so these images "
                               "are noise-like and mean nothing (pipeline check only)")
    for name in ("base", "final", "transfer"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    base_weights = {key: entry["identity"] for key, entry in identify(params, root, ("model.base", "model.vae")).items()}
    base_weights.update(cache_key_fields(params.model.quantize))  # a quantized base renders other pixels
    weights_dir = choose_weights(trained_dir, config.use_ema, None, config.weights, "render.weights")  # what apply_trained loads
    trained_weights = weights_identity(weights_dir, root)
    base_cache = ImageCache(root / params.store_dir, {"base": base_weights}, device, dtype, facts.pipeline)
    final_cache = ImageCache(root / params.store_dir, {
        "base": base_weights,
        "trained": {"prediction_type": state.get("prediction_type"), "weights": trained_weights},
        "lora_scale": config.lora_scale, "use_ema": config.use_ema}, device, dtype, facts.pipeline)
    missing_base, missing_final = base_cache.missing(prompts), final_cache.missing(prompts)
    latents_dir = root / LATENTS_DIR
    has_latents = (latents_dir / "manifest.jsonl").is_file()
    jobs: list[Any] = []
    if config.transfer and len(params.datasets) >= 2 and has_latents:
        sources = transfer_sources(params, latents_dir, root / CAPTIONED_DIR)
        if len(sources) >= 2:
            jobs, warnings = transfer_jobs(sources)
            report.warnings.extend(warnings)
    steps = config.steps if config.steps is not None else variant.steps
    guidance_scale = config.guidance_scale if config.guidance_scale is not None else variant.guidance_scale
    transfer_settings = {"strength": config.transfer_strength,
                         "steps": transfer_steps(steps, config.transfer_strength),
                         "guidance_scale": guidance_scale, "sampler": config.sampler, "karras": config.karras,
                         "seed": config.seed}

    def transfer_path(job: Any) -> Path:
        return final_cache.entry_path("transfer", {"source_image": job.source.image_key, "prompt": job.prompt,
                                                   **transfer_settings})

    missing_transfer = [job for job in jobs if not transfer_path(job).is_file()]
    diagnostics_path = None
    if config.diagnostics and facts.diagnostics:
        report.warnings.append(f"diagnostics: skipped. {facts.diagnostics}")
    elif config.diagnostics and has_latents:
        diagnostics_path = final_cache.entry_path("diagnostics", {
            "latents": file_digest(latents_dir / "manifest.jsonl"),
            "datasets": [[d.folder, d.trigger_word] for d in params.datasets],
            **{key: getattr(config, key) for key in ("diagnostic_timesteps", "diagnostic_samples", "diagnostic_token",
                                                      "seed", "sheet_tile")}})
    elif config.diagnostics:
        report.warnings.append(f"diagnostics: {latents_dir} has no manifest.jsonl, no diagnostic sheet")
    diagnostics_notes = diagnostics_path.with_suffix(".json") if diagnostics_path else None
    missing_diagnostics = diagnostics_path is not None and not diagnostics_path.is_file()
    prompts_from = None  # nothing rendered
    if missing_base or missing_final or missing_transfer or missing_diagnostics:  # else no model is loaded
        # From the cached embeddings when every text is there: no text encoder is loaded.
        embedded, why = render_prompt_embeddings(params.model, root, family, state, dtype,
                                                 [*missing_base, *missing_final],
                                                 [job.prompt for job in missing_transfer],
                                                 latents_dir if missing_diagnostics else None)
        prompts_from = f"cache ({layout.PROMPT_EMBEDS})" if embedded is not None else "text encoders"
        if why:
            report.warnings.append(f"prompts encoded with the text encoders: {why}")
        pipeline = load_base_pipeline(params.model, root, device, config.dtype, family,
                                      text_encoders=embedded is None)
        total = len(missing_base) + len(missing_final) + len(missing_transfer) + int(missing_diagnostics)
        with progress_bar("render", total) as advance:
            render_prompts(pipeline, missing_base, None, path_of=counted(base_cache.path, advance), embedded=embedded)
            if missing_final or missing_transfer or missing_diagnostics:
                applied = apply_trained(pipeline, trained_dir, config.lora_scale, config.use_ema, config.weights)
                report.warnings.extend(applied.warnings)
                for line in applied.loaded:
                    console.print(f"render: {line}", markup=False, soft_wrap=True)
                render_prompts(pipeline, missing_final, None, path_of=counted(final_cache.path, advance),
                               embedded=embedded)
                render_transfer(pipeline, missing_transfer, counted(transfer_path, advance),
                                strength=config.transfer_strength, steps=steps, guidance_scale=guidance_scale,
                                sampler=config.sampler, karras=config.karras, seed=config.seed, embedded=embedded)
                if missing_diagnostics:
                    _, warnings = diagnostic_sheet(pipeline, params, latents_dir, diagnostics_path, config)
                    atomic_write_json(diagnostics_notes, {"warnings": warnings})  # shown again on cached runs
                    advance()
        del pipeline
        release(device)
    base = base_cache.place(prompts, out_dir / "base")
    final = final_cache.place(prompts, out_dir / "final")
    # What the final images show, so export can refuse samples of other weights (an older run, the
    # EMA choice, a LoRA scale other than the exported strength 1).
    atomic_write_json(out_dir / "final" / WEIGHTS_RECORD, {
        "weights_identity": trained_weights,
        "weights": "best" if config.weights == "best" else "trained" if weights_dir == trained_dir else "ema",
        "lora_scale": config.lora_scale})
    images = [*base, *final]

    live = live_steps(trained_dir / LIVE_DIR, out_dir / LIVE_DIR)
    columns = [("base", out_dir / "base"), *[(f"step {step}", folder) for step, folder in live],
               ("final", out_dir / "final")]
    sheet = contact_sheet(columns, prompts, out_dir / "contact_sheet.png", config.sheet_tile)
    sheets = [sheet]
    transfer = [out_dir / "transfer" / job.name for job in jobs]
    for job, path in zip(jobs, transfer):
        link_or_copy(transfer_path(job), path)
    if diagnostics_path is not None:
        (out_dir / "diagnostics.png").unlink(missing_ok=True)
        link_or_copy(diagnostics_path, out_dir / "diagnostics.png")
        sheets.append(out_dir / "diagnostics.png")
        if diagnostics_notes.is_file():
            report.warnings.extend(json.loads(diagnostics_notes.read_text("utf-8"))["warnings"])

    vae_sheets = autoencoder_sheets(params, root, out_dir)
    _log_images(tracker, [*images, *transfer, *sheets, *vae_sheets], out_dir)
    # Items: the base, final and transfer images and the diagnostic sheet (not the contact sheet,
    # which is put together from the others on every run).
    report.computed = len(missing_base) + len(missing_final) + len(missing_transfer) + int(missing_diagnostics)
    report.reused = len(images) + len(transfer) + int(diagnostics_path is not None) - report.computed
    report.extra.update({
        "prompts": len(prompts),
        "live_steps": len(live),
        "transfer_images": len(transfer),
        "base_rendered": len(missing_base),
        "final_rendered": len(missing_final),
        "transfer_rendered": len(missing_transfer),
        "diagnostics_rendered": int(missing_diagnostics),
        "mean_abs_diff_vs_base": round(_mean_abs_difference(base, final), 4),
        "random_tiny_model": tiny,
        "prompt_embeddings": prompts_from,
        "family": family.name,
        **render_defaults(variant, config),
    })
    if vae_sheets:
        report.extra["autoencoder_sheets"] = relative_to_root(Path(out_dir) / "autoencoder", root)
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(Path(metrics_dir))
    return report
