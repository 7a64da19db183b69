"""Stage `autoencoder`: fine-tune the VAE on the bucketed images, on the trainer core.

Off (`autoencoder.enabled: false`, the default) it is a no-op that records so, and the latents
stage keeps using model.vae / the base VAE. On, it writes a diffusers AutoencoderKL folder to
models/autoencoder (the EMA weights when EMA is on), which the latents stage then encodes with.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from tuneline.config import Params
from tuneline.core import layout
from tuneline.core.fsutil import atomic_write_json, relative_to_root
from tuneline.core.report import StageReport
from tuneline.models.ref import is_tiny

STAGE = "autoencoder"
CHECKPOINTS = "checkpoints/autoencoder"
DISABLED_FILE = "disabled.json"


def is_trained(folder: Path) -> bool:
    """Whether `folder` holds a trained VAE (the stage ran enabled)."""
    return (Path(folder) / "config.json").is_file()


class Evaluation:
    """PSNR/SSIM on the held-out images every eval_every steps (no RNG used: exact resume holds)."""

    def __init__(self, holdout: dict[str, Any], tracker: Any) -> None:
        self.holdout, self.tracker, self.history = holdout, tracker, []

    def __call__(self, trainer: Any) -> dict[str, float]:
        from tuneline.stages.autoencoder.evaluate import evaluate

        vae = trainer.accelerator.unwrap_model(trainer.modules["vae"])
        metrics = evaluate(vae, self.holdout)
        self.history.append({"step": trainer.state.step, **metrics})
        if self.tracker is not None:
            self.tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=trainer.state.step)
        return metrics


def run(params: Params, root: Path, bucketed_dir: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None, checkpoint_dir: Path | None = None) -> StageReport:
    from tuneline.models.loading import load_vae
    from tuneline.models.registry import build_adapter
    from tuneline.stages.autoencoder.data import ImageData
    from tuneline.stages.autoencoder.evaluate import evaluate, reconstruct, reconstruction_sheet
    from tuneline.train.trainer import Trainer

    started = time.perf_counter()
    config = params.autoencoder
    out_dir = Path(out_dir)
    report = StageReport(STAGE, metric_keys=("enabled", "steps", "psnr", "ssim", "psnr_base", "ssim_base"))
    if not config.enabled:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / DISABLED_FILE, {"enabled": False})
        report.extra["enabled"] = 0
        report.warnings.append("autoencoder.enabled is false: nothing trained; latents use model.vae / the base VAE")
        if metrics_dir is not None:
            report.write_metrics(metrics_dir)
        return report
    if is_tiny(params.model.base):
        report.warnings.append(f"model.base is {params.model.base!r}: a tiny RANDOM-weight VAE (pipeline check only)")
    if config.perceptual == "none":
        report.warnings.append("autoencoder.perceptual is none: no LPIPS term (set lpips with its weights on disk)")
    data = ImageData(params, bucketed_dir)
    holdout = data.holdout_pixels()
    evaluation = Evaluation(holdout, tracker)
    adapter = build_adapter("autoencoder_kl", params.model, config, root)
    trainer = Trainer(params, root, None, checkpoint_dir or Path(root) / CHECKPOINTS, adapter, tracker,
                      config=config, data=data, section=STAGE, live_eval=evaluation, live_every=config.eval_every)
    trainer.setup()
    base_vae = load_vae(params.model, root, "fp32", "cpu")
    base = evaluate(base_vae, holdout)

    def on_log(state: Any, result: Any, seconds: float) -> None:
        if tracker is not None:
            tracker.log_metrics({"loss": result.loss, **result.unit_numbers(), **result.extra,
                                 **{f"lr/{k}": v for k, v in result.lrs.items()}}, step=state.step)

    summary = trainer.fit(on_log=on_log)
    shutil.rmtree(out_dir, ignore_errors=True)
    trainer.save_outputs(out_dir / "_raw")
    # The stage's output is the weights latents should use: the EMA ones when EMA is on.
    chosen = out_dir / "_raw" / "ema" if trainer.ema is not None else out_dir / "_raw"
    for path in chosen.iterdir():
        if path.is_file():
            shutil.move(str(path), out_dir / path.name)
    shutil.rmtree(out_dir / "_raw")
    from diffusers import AutoencoderKL

    trained = AutoencoderKL.from_pretrained(out_dir)
    final = evaluate(trained, holdout)
    sheets = {}
    for dataset, items in sorted(holdout.items()):
        import torch

        pixels = torch.stack([p for _, p in items])
        rows = list(zip(pixels, reconstruct(base_vae, pixels), reconstruct(trained, pixels)))
        sheet = reconstruction_sheet(rows, out_dir / "sheets" / f"{dataset}.png")
        sheets[dataset] = relative_to_root(sheet, Path(root))
        if tracker is not None:
            tracker.log_artifact(out_dir / "sheets" / f"{dataset}.png", STAGE)
    report.computed = summary["session_steps"]
    report.reused = summary["steps"] - summary["session_steps"]
    report.extra.update({"enabled": 1, "steps": summary["steps"], "psnr": final["psnr"], "ssim": final["ssim"],
                         "psnr_base": base["psnr"], "ssim_base": base["ssim"], "final": final, "base": base,
                         "history": evaluation.history, "sheets": sheets, "ema": trainer.ema is not None})
    report.warnings.extend(trainer.messages)
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
        atomic_write_json(Path(metrics_dir) / f"{STAGE}.json",
                          {k: report.extra[k] for k in ("enabled", "steps", "psnr", "ssim", "psnr_base", "ssim_base",
                                                        "final", "base", "history", "sheets")})
    return report
