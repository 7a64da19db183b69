"""Stage `autoencoder`: fine-tune the VAE (kind kl) or train a VQ autoencoder (kind vq) on the
bucketed images, on the trainer core.

Off (`autoencoder.enabled: false`, the default) it is a no-op that records so, and the stages
after it keep using model.vae / the base VAE. On, kind kl writes a diffusers AutoencoderKL folder to
models/autoencoder (the EMA weights when EMA is on), which latents, train, render and export
then use as model.vae (`tuneline.stages.autoencoder.with_trained_vae`); kind vq writes a diffusers
VQModel folder there, a deliverable of its own that those stages refuse. The kind's adapter
(tuneline.models.autoencoder) says how to build, reconstruct and load its network. Beside the weights:
`autoencoder_state.json` (steps, seed, settings) and `sheets/<data set>.png`, one row per
held-out image: input | reference | trained (the reference: the base VAE for kl, the RANDOM
VQ model training started from for vq).

PSNR/SSIM of the held-out images go to MLflow every eval_every steps (the raw weights), and
for the written weights at the end to MLflow and metrics/autoencoder.json. Checkpoints live
in checkpoints/autoencoder/<run key>/ and persist, so an interrupted run resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.config import Params
from tuneline.core import layout
from tuneline.core.fsutil import atomic_write_json, atomic_write_text, rebuilt_dir, relative_to_root
from tuneline.core.report import StageReport
from tuneline.models.ref import is_tiny

if TYPE_CHECKING:
    from tuneline.stages.autoencoder.data import ImageData
    from tuneline.train.trainer import Trainer

STAGE = "autoencoder"
DISABLED_FILE = "disabled.json"
DISABLED_MARKER = "DISABLED.txt"  # in the checkpoints folder while the stage is off
STATE_FILE = "autoencoder_state.json"
SHEETS = "sheets"
# metrics/autoencoder.json: what the inputs decide (psnr/<data set> and ssim/<data set> join them).
METRIC_KEYS = ("enabled", "steps", "psnr", "ssim", "psnr_base", "ssim_base")


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
        metrics = evaluate(vae, self.holdout, trainer.adapter.reconstruct)
        self.history.append({"step": trainer.state.step, **metrics})
        if self.tracker is not None:
            self.tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=trainer.state.step)
        return metrics


def _disabled(out_dir: Path, metrics_dir: Path | None, checkpoint_dir: Path) -> StageReport:
    report = StageReport(STAGE, metric_keys=("enabled",))
    checkpoint_dir.mkdir(parents=True, exist_ok=True)  # a declared output of dvc.yaml: it must exist
    # ... and hold a file: DVC warns "'checkpoints/autoencoder' is empty" on every repro otherwise. The
    # runs' folders sit beside it (<run key>/step_*), so a later enabled run trains and resumes as ever.
    marker = checkpoint_dir / DISABLED_MARKER
    if not marker.is_file():
        atomic_write_text(marker, "autoencoder.enabled is false: no autoencoder checkpoints. This file keeps the "
                                  "folder, a DVC output, from being empty.\n")
    with rebuilt_dir(out_dir) as staging:
        atomic_write_json(staging / DISABLED_FILE, {"enabled": False})
    report.extra["enabled"] = 0
    report.warnings.append("autoencoder.enabled is false: nothing trained; later stages use model.vae / the base VAE")
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
    return report


def build_trainer(params: Params, root: Path, data: ImageData, checkpoint_dir: Path, *,
                  live_eval: Callable[[Trainer], Any] | None = None, live_every: int = 0) -> Trainer:
    """The autoencoder stage's Trainer (not set up): the autoencoder section and its kind's adapter
    (autoencoder.kind) on `data` (the bucketed images: ImageData), the base model's identity."""
    from tuneline.models.autoencoder import autoencoder_kind
    from tuneline.models.registry import build_adapter
    from tuneline.train.adapter import ModelSource
    from tuneline.train.trainer import Trainer

    adapter = build_adapter(autoencoder_kind(params.autoencoder.kind).registry_name, params.model,
                            params.autoencoder, root)
    return Trainer(params.autoencoder, adapter, data, ModelSource.of(params.model, root), checkpoint_dir,
                   live_eval=live_eval, live_every=live_every)


def run(params: Params, root: Path, bucketed_dir: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None, checkpoint_dir: Path | None = None) -> StageReport:
    """Train (or resume) the VAE and write it; a recorded no-op when autoencoder.enabled is false.
    Raises StopRequested / TrainingDiverged / ResumeRefused as the train stage does."""
    config = params.autoencoder
    root = Path(root)
    checkpoint_dir = Path(checkpoint_dir or root / layout.AUTOENCODER_CHECKPOINTS)
    if not config.enabled:
        return _disabled(Path(out_dir), metrics_dir, checkpoint_dir)

    import torch

    from tuneline.models.autoencoder import autoencoder_kind
    from tuneline.stages.autoencoder.data import ImageData
    from tuneline.stages.autoencoder.evaluate import evaluate, reconstruction_sheet
    from tuneline.train.runs import track_training_run, write_run_record

    started = time.perf_counter()
    report = StageReport(STAGE, metric_keys=METRIC_KEYS)
    if is_tiny(params.model.base) or is_tiny(params.model.vae or ""):
        report.warnings.append(f"model.base is {params.model.base!r}: a tiny RANDOM-weight VAE (pipeline check only)")
    kind = autoencoder_kind(config.kind)
    if kind.warning:
        report.warnings.append(kind.warning)
    if config.perceptual == "none":
        report.warnings.append("autoencoder.perceptual is none: no LPIPS term (set lpips with its weights on disk)")
    data = ImageData(params, bucketed_dir)
    holdout = data.holdout_pixels()
    evaluation = Evaluation(holdout, tracker)
    trainer = build_trainer(params, root, data, checkpoint_dir, live_eval=evaluation, live_every=config.eval_every)
    trainer.setup()
    main = trainer.accelerator.is_main_process
    first_step = trainer.state.step
    mlflow_run_id = track_training_run(trainer, tracker) if main else None
    if tracker is not None:
        tracker.log_params({"autoencoder": config.model_dump(mode="json"), "model": params.model.model_dump(mode="json"),
                            "seed_used": trainer.seed, "data_digest": trainer.data_digest,
                            "crop": data.crop, "holdout_images": sum(len(v) for v in holdout.values())})

    last_logged: dict[str, float] = {}

    def on_log(state: Any, result: Any, seconds_per_step: float) -> None:
        last_logged.clear()
        last_logged.update(step=state.step, loss=result.loss, **result.extra)  # the kind's terms (vq: perplexity...)
        if tracker is not None and main:
            numbers = {"loss": result.loss, "seconds_per_step": seconds_per_step, **result.unit_numbers(),
                       **result.extra, **{f"lr/{name}": lr for name, lr in result.lrs.items()}}
            tracker.log_metrics(numbers, step=state.step)

    summary = trainer.fit(on_log=on_log)
    if main and trainer.state.step > first_step and trainer.saved_at_current_step():
        write_run_record(trainer, mlflow_run_id)
    adapter = trainer.adapter
    base_vae = adapter.reference_network(trainer.seed)
    with rebuilt_dir(out_dir) as staging:
        trainer.save_outputs(staging, only_ema=True)  # the weights later stages should use
        trained = adapter.load_output(staging)
        base, final = evaluate(base_vae, holdout, adapter.reconstruct), evaluate(trained, holdout, adapter.reconstruct)
        sheets = {}
        for dataset, items in sorted(holdout.items()):
            pixels = torch.stack([p for _, p in items])
            rows = list(zip(pixels, adapter.reconstruct(base_vae, pixels), adapter.reconstruct(trained, pixels)))
            sheets[dataset] = reconstruction_sheet(rows, staging / SHEETS / f"{dataset}.png").name
        atomic_write_json(staging / STATE_FILE, {
            "steps": trainer.state.step, "epochs": trainer.state.epoch, "seed_used": trainer.seed,
            "data_digest": trainer.data_digest, "run_key": trainer.run_key, "ema_weights": trainer.ema is not None,
            "mode": config.mode, "base_vae": params.model.vae or params.model.base, "kind": config.kind,
            "base": kind.reference,
            "random_tiny_model": is_tiny(params.model.base), "crop": data.crop,
            "holdout": {dataset: [name for name, _ in items] for dataset, items in sorted(holdout.items())},
            "psnr": final["psnr"], "ssim": final["ssim"], "psnr_base": base["psnr"], "ssim_base": base["ssim"]})
    sheet_paths = {dataset: relative_to_root(Path(out_dir) / SHEETS / name, root) for dataset, name in sheets.items()}
    if tracker is not None and main:
        tracker.log_metrics({f"final/{k}": v for k, v in final.items()} | {f"base/{k}": v for k, v in base.items()},
                            step=trainer.state.step)
        for dataset in sheets:
            tracker.log_artifact(Path(out_dir) / SHEETS / sheets[dataset], f"{STAGE}/sheets")
    per_dataset = {key: value for key, value in final.items() if "/" in key}
    report.metric_keys = METRIC_KEYS + tuple(sorted(per_dataset))
    report.computed = summary["session_steps"]
    report.reused = summary["steps"] - summary["session_steps"]
    report.extra.update({"enabled": 1, "steps": summary["steps"], "psnr": final["psnr"], "ssim": final["ssim"],
                         "psnr_base": base["psnr"], "ssim_base": base["ssim"], **per_dataset,
                         "run_key": trainer.run_key, "history": evaluation.history, "sheets": sheet_paths,
                         "ema": trainer.ema is not None, "kind": config.kind, "last_logged": dict(last_logged)})
    report.warnings.extend(trainer.messages)
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None and main:
        report.write_metrics(metrics_dir)
    return report
