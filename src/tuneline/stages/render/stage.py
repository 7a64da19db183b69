"""Stage `render`: the base and the trained model on the same prompts and seeds, and sheets.

Writes into the output folder (renders/):
  base/<i>.png, final/<i>.png     every prompt, base and trained, same seeds
  contact_sheet.png               prompts x (base, each live/step_N found, final)
  transfer/<a>_to_<b>.png         two or more data sets: img2img into the other trigger word
  diagnostics.png                 x_t / x0 prediction / cross-attention of training samples
and metrics/render.json. live/ (written during training) is read, never removed.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from tuneline.config import Params
from tuneline.core.fsutil import atomic_write_json
from tuneline.models.ref import is_tiny
from tuneline.core.report import StageReport, console

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


def run(params: Params, root: Path, trained_dir: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None) -> StageReport:
    """Render base and trained images, the contact sheet, domain transfer and the diagnostic sheet."""
    from tuneline.models.loading import release, resolve_device, resolve_dtype
    from tuneline.models.ref import identify
    from tuneline.stages.render.cache import ImageCache
    from tuneline.stages.render.diagnostics import diagnostic_sheet
    from tuneline.stages.render.generate import (
        LIVE_DIR,
        WEIGHTS_RECORD,
        _weights_dir,
        apply_trained,
        load_base_pipeline,
        render_prompts,
        trainer_state,
        weights_identity,
    )
    from tuneline.stages.render.prompts import load_prompts
    from tuneline.stages.render.sheets import contact_sheet, live_steps
    from tuneline.stages.render.transfer import render_transfer, transfer_sources

    started = time.perf_counter()
    root, trained_dir, out_dir = Path(root), Path(trained_dir), Path(out_dir)
    config = params.render
    prompts = load_prompts(root / config.prompts_file, config)  # a bad file stops before any model loads
    if not trained_dir.is_dir():
        raise FileNotFoundError(f"{trained_dir} does not exist: run stage train first")
    report = StageReport(STAGE)
    tiny = is_tiny(params.model.base) or bool(trainer_state(trained_dir).get("random_tiny_model"))
    if tiny:
        report.warnings.append(f"model.base is {params.model.base!r}: a tiny RANDOM-weight model, so these images "
                               "are noise-like and mean nothing (pipeline check only)")
        console.print("render: the model is a tiny RANDOM-weight model; its images mean nothing", markup=False)
    for name in ("base", "final", "transfer"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    base_weights = {key: entry["identity"] for key, entry in identify(params, root, ("model.base", "model.vae")).items()}
    weights_dir = _weights_dir(trained_dir, config.use_ema, [])  # what apply_trained loads
    trained_weights = weights_identity(weights_dir, root)
    base_cache = ImageCache(root / params.store_dir, {"base": base_weights}, device, dtype)
    final_cache = ImageCache(root / params.store_dir, {
        "base": base_weights,
        "trained": {"prediction_type": trainer_state(trained_dir).get("prediction_type"), "weights": trained_weights},
        "lora_scale": config.lora_scale, "use_ema": config.use_ema}, device, dtype)
    missing_base, missing_final = base_cache.missing(prompts), final_cache.missing(prompts)
    wants_transfer = config.transfer and len(params.datasets) >= 2
    pipeline = None
    if missing_base or missing_final or wants_transfer or config.diagnostics:
        pipeline = load_base_pipeline(params.model, root, device, config.dtype)
        render_prompts(pipeline, missing_base, None, path_of=base_cache.path)
        applied = apply_trained(pipeline, trained_dir, config.lora_scale, config.use_ema)
        report.warnings.extend(applied.warnings)
        for line in applied.loaded:
            console.print(f"render: {line}", markup=False, soft_wrap=True)
        render_prompts(pipeline, missing_final, None, path_of=final_cache.path)
    base = base_cache.place(prompts, out_dir / "base")
    final = final_cache.place(prompts, out_dir / "final")
    # What the final images show, so export can refuse samples of other weights (an older run, the
    # EMA choice, a LoRA scale other than the exported strength 1).
    atomic_write_json(out_dir / "final" / WEIGHTS_RECORD, {
        "weights_identity": trained_weights,
        "weights": "trained" if weights_dir == trained_dir else "ema", "lora_scale": config.lora_scale})
    images = [*base, *final]

    live = live_steps(trained_dir / LIVE_DIR, out_dir / LIVE_DIR)
    columns = [("base", out_dir / "base"), *[(f"step {step}", folder) for step, folder in live],
               ("final", out_dir / "final")]
    sheet = contact_sheet(columns, prompts, out_dir / "contact_sheet.png", config.sheet_tile)
    sheets = [sheet]

    transfer: list[Path] = []
    latents_dir = root / LATENTS_DIR
    if wants_transfer and (latents_dir / "manifest.jsonl").is_file():
        sources = transfer_sources(params, latents_dir, root / CAPTIONED_DIR)
        if len(sources) >= 2:
            transfer, warnings = render_transfer(
                pipeline, sources, out_dir / "transfer", strength=config.transfer_strength, steps=config.steps,
                guidance_scale=config.guidance_scale, sampler=config.sampler, karras=config.karras, seed=config.seed)
            report.warnings.extend(warnings)
    if config.diagnostics:
        if (latents_dir / "manifest.jsonl").is_file():
            path, warnings = diagnostic_sheet(pipeline, params, latents_dir, out_dir / "diagnostics.png", config)
            sheets.append(path)
            report.warnings.extend(warnings)
        else:
            report.warnings.append(f"diagnostics: {latents_dir} has no manifest.jsonl, no diagnostic sheet")
    del pipeline
    release(device)

    _log_images(tracker, [*images, *transfer, *sheets], out_dir)
    rendered = len(missing_base) + len(missing_final)
    report.computed = rendered + len(transfer)
    report.reused = len(images) - rendered
    report.extra.update({
        "prompts": len(prompts),
        "live_steps": len(live),
        "transfer_images": len(transfer),
        "base_rendered": len(missing_base),
        "final_rendered": len(missing_final),
        "mean_abs_difference_trained_vs_base": round(_mean_abs_difference(base, final), 4),
        "random_tiny_model": tiny,
    })
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(Path(metrics_dir))
    return report
