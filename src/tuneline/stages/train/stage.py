"""Stage `train`: the trainer core with the adapter of model.base's family (tuneline.models.family),
on the latents stage's output.

Writes the trained result to `out_dir` (LoRA in diffusers format and/or a full pipeline
folder), `trainer_state.json`, metrics/train.json and the loss curve, as metrics/train_loss.csv
(step, loss, lr, the style/structure loss's parts when a weight is set, and loss/instance and loss/prior
when a data set regularizes: `dvc plots show` draws it) and metrics/train_loss.png (loss and learning rate,
drawn here: an image plot shows offline). With train.validation on: metrics/train_val.csv (the
validation loss per step, data set and level; a third panel in the picture), the best validation
loss and its step in metrics/train.json and trainer_state.json, its weights in `out_dir/best/`. Checkpoints live in `checkpoint_dir/<run key>/`,
which persists between runs: running the stage again after an interruption resumes from the
latest one; changed settings or data start a new run (see tuneline.train.checkpoint.run_key).

Everything DVC tracks is a function of the run's inputs and its history: the same run gives the
same bytes, whether DVC or the Prefect flow runs the stage and whether it trains steps or finds
them done. What only this session knows (MLflow run ids, wall-clock times) goes to the run's
checkpoint folder (`run.json`, the loss history's timing column), MLflow and reports/train.json.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tuneline.config import Params
from tuneline.core import layout
from tuneline.core.fsutil import atomic_write_bytes, atomic_write_json, rebuilt_dir
from tuneline.models.ref import is_tiny
from tuneline.core.report import StageReport
from tuneline.stages.train.plot import write_loss_curve_png
from tuneline.train.runs import MLFLOW_RUN_FILE, track_training_run, write_run_record  # noqa: F401
from tuneline.train.output import BEST_DIR, LIVE_DIR, TRAINER_STATE

STAGE = "train"
LOSS_CURVE = "train_loss.csv"
VALIDATION_CURVE = "train_val.csv"  # step, loss, loss_unweighted, loss/<data set>, loss/t<k>
LOSS_PICTURE = "train_loss.png"
RUN_RECORD = layout.TRAIN_RUN_RECORD  # noqa: F401  (tests read the name here)

if TYPE_CHECKING:
    from tuneline.stages.render.embeds import PromptEmbeddings
    from tuneline.train.adapter import TrainerAdapter
    from tuneline.train.data import LatentData
    from tuneline.train.trainer import Trainer


def rows_until(path: Path, step: int) -> list[dict[str, str]]:
    """The rows of the run's CSV at `path` up to `step` (a resumed run drops the rows it will write again)."""
    if not (path.is_file() and step > 0):
        return []
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(row["step"]) <= step]


def csv_bytes(fields: list[str], rows: list[dict[str, str]]) -> bytes:
    """The tracked CSV (metrics/*.csv, DVC outputs) of `rows` in the columns `fields`: CRLF lines, empty cells."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields, restval="", extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")


class LossCurve:
    """The run's loss history, kept beside its checkpoints: one row per logged step (step, loss, lr,
    and the wall seconds per step since the previous row); rows past a resumed step are dropped.
    `terms`: more columns, the loss's parts (the style/structure loss's, when it is on; a data set with
    no sample in a logged step leaves its cells empty)."""

    FIELDS = ["step", "loss", "lr", "seconds_per_step"]
    TRACKED = ["step", "loss", "lr"]  # what metrics/train_loss.csv (a DVC output) gets: no timings

    def __init__(self, path: Path, resumed_step: int, terms: list[str] | None = None) -> None:
        self.path = Path(path)
        self.terms = list(terms or [])
        self.fields, self.tracked = self.FIELDS + self.terms, self.TRACKED + self.terms
        self.rows = rows_until(self.path, resumed_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=self.fields, restval="", extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(self.rows)
        self.handle.flush()

    def add(self, step: int, loss: float, lr: float, seconds_per_step: float,
            terms: dict[str, float] | None = None) -> None:
        row = {"step": str(step), "loss": f"{loss:.6f}", "lr": f"{lr:.6e}",
               "seconds_per_step": f"{seconds_per_step:.4f}"}
        row |= {name: f"{value:.6f}" for name, value in (terms or {}).items() if name in self.terms}
        self.rows.append(row)
        self.writer.writerow(row)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()

    def tracked_csv(self) -> bytes:
        """metrics/train_loss.csv: step, loss, lr (and the loss's parts, `terms`) of every row."""
        return csv_bytes(self.tracked, self.rows)

    def last_loss(self) -> float | None:
        return float(self.rows[-1]["loss"]) if self.rows else None

    def seconds_per_step(self) -> float | None:
        """Wall seconds per step over the run's logged steps, from its history: a session that
        trains nothing gives the same number again."""
        total = steps = 0.0
        previous = 0
        for row in self.rows:
            step = int(row["step"])
            if row.get("seconds_per_step"):
                total += float(row["seconds_per_step"]) * (step - previous)
                steps += step - previous
            previous = step
        return round(total / steps, 4) if steps else None


class ValidationCurve:
    """The run's validation history, kept beside its checkpoints like the loss curve: one row per
    validation (step, then the `val/` metrics without the prefix); rows past a resumed step are dropped."""

    def __init__(self, path: Path, resumed_step: int, names: list[str]) -> None:
        self.path = Path(path)
        self.rows = rows_until(self.path, resumed_step)
        columns = ["step", *(self.column(name) for name in names)]
        # Columns of earlier sessions (another data set, other levels) stay, after today's.
        self.fields = columns + [key for row in self.rows for key in row if key not in columns]
        self.fields = list(dict.fromkeys(self.fields))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_all()

    @staticmethod
    def column(name: str) -> str:
        return name.removeprefix("val/")

    def _write_all(self) -> None:
        atomic_write_bytes(self.path, self.tracked_csv())

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": str(step), **{self.column(k): f"{v:.6f}" for k, v in metrics.items()}})
        self.fields = list(dict.fromkeys(self.fields + list(self.rows[-1])))
        self._write_all()

    def tracked_csv(self) -> bytes:
        """metrics/train_val.csv: every row (the header alone when the run validates nothing)."""
        return csv_bytes(self.fields, self.rows)

    def best(self) -> tuple[int, float] | None:
        """(step, loss) of the lowest validation loss in the history, the earliest on a tie."""
        scored = [(float(row["loss"]), int(row["step"])) for row in self.rows if row.get("loss")]
        if not scored:
            return None
        loss, step = min(scored)
        return step, loss


def live_dir(trainer: Any) -> Path:
    return trainer.checkpoint_dir / LIVE_DIR


class LiveEvaluation:
    """Renders the first render.live_prompts prompts with the live modules (see tuneline.stages.render.generate).

    The prompts come as the embeddings the latents stage cached (data/prompt_embeds): then no text
    encoder is loaded and only the VAE joins the training modules on the GPU, for the decode. When one
    is not cached (the prompts file edited since, or trained text encoders) the text encoders encode
    them, with one warning. What only rendering needs (the VAE, and those text encoders when training
    uses cached embeddings) is loaded once, kept on the CPU, and on the GPU only while rendering, so
    the training steps never share the card with it. Rendering runs under the training's autocast:
    the frozen weights are in its compute dtype, the LoRA weights in fp32.
    """

    def __init__(self, params: Params, root: Path, tracker: Any) -> None:
        self.params, self.root, self.tracker = params, Path(root), tracker
        self.pipeline: Any = None
        self.prompts: list[Any] = []
        self.embedded: PromptEmbeddings | None = None  # the prompts' cached embeddings (None: encode them)
        self.offloaded: list[Any] = []  # modules that live on the CPU between renders

    def cached_prompts(self, trainer: Any) -> PromptEmbeddings | None:
        """The live prompts' cached embeddings, or None (then one warning says why, unless the run
        trains a text encoder: its samples must show what the trained encoders make of the prompts)."""
        from tuneline.stages.render.generate import live_prompt_embeddings

        embedded, why = live_prompt_embeddings(self.params, self.root, self.prompts)
        if why:
            message = f"live samples encode their prompts with the text encoders: {why}"
            trainer.accelerator.print(message)
            trainer.messages.append(message)  # and in the report's warnings
        return embedded

    def text_encoders(self, trainer: Any) -> list[Any]:
        """The frozen text encoders for rendering from text, loaded on the CPU when training did not need
        them (those it loaded here live on the CPU between renders: returned)."""
        loaded_before = list(trainer.adapter.text_encoders)
        encoders = trainer.adapter.ensure_text_encoders("cpu")
        return [encoder for encoder in encoders if encoder not in loaded_before]

    def __call__(self, trainer: Any) -> None:
        from tuneline.models.loading import load_vae
        from tuneline.models.training_adapter import training_adapter_off
        from tuneline.stages.render.generate import live_evaluate, live_prompts, pipeline_from_training

        device = trainer.accelerator.device
        if self.pipeline is None:  # built once: it shares the live modules, it does not copy them
            self.prompts = live_prompts(self.params, self.root)
            self.embedded = self.cached_prompts(trainer)
            vae = load_vae(self.params.model, self.root, "fp32", "cpu")
            self.offloaded = [vae] + (self.text_encoders(trainer) if self.embedded is None else [])
            self.pipeline = pipeline_from_training(trainer.adapter, trainer.modules, vae,
                                                   text_encoders=self.embedded is None)
        for module in self.offloaded:
            module.to(device)
        try:  # live samples show the model users get: without model.training_adapter
            with trainer.accelerator.autocast(), training_adapter_off(self.pipeline.components.values()):
                live_evaluate(self.pipeline, self.prompts, live_dir(trainer), trainer.state.step, self.tracker,
                              self.embedded)
        finally:
            if device.type != "cpu":
                for module in self.offloaded:
                    module.to("cpu")


def structure_columns(params: Params) -> list[str]:
    """The loss curve's columns of the style/structure loss (tuneline.train.structure_loss.metric_names) when
    a data set has a weight; none when every weight is 0 (the curve is the one runs wrote before)."""
    from tuneline.train.structure_loss import metric_names

    if not any(any(params.structure_for(dataset).weights) for dataset in params.datasets):
        return []
    return metric_names(sorted(dataset.folder for dataset in params.datasets))


def prior_columns(params: Params) -> list[str]:
    """The loss curve's columns of the loss split by role (loss/instance, loss/prior) when a data set regularizes
    (datasets[].role); none otherwise (the curve is the one runs wrote before)."""
    from tuneline.train.prior import METRICS

    return list(METRICS) if any(dataset.prior_kind for dataset in params.datasets) else []


def latent_data(params: Params, latents_dir: Path) -> LatentData:
    """The latents stage's output as the train section trains on it (data set weights, bucket batch sizes); a
    regularization data set's loss weight is its loss_weight times its prior_loss_weight."""
    from tuneline.train.data import DatasetWeights, LatentData

    weights = {dataset.folder: DatasetWeights(dataset.repeats, dataset.loss_weight * dataset.prior_loss_weight,
                                              params.structure_for(dataset).weights, dataset.prior_kind)
               for dataset in params.datasets}
    return LatentData(latents_dir, params.train, weights, params.bucket.batch_size_for)


def build_trainer(params: Params, root: Path, latents_dir: Path, checkpoint_dir: Path,
                  adapter: TrainerAdapter | None = None, *, resume_from: Path | None = None,
                  live_eval: Callable[[Trainer], Any] | None = None, live_every: int = 0) -> Trainer:
    """The train stage's Trainer (not set up): the train section, the adapter of model.base's family
    (or `adapter`), the latents, the base model's identity."""
    from tuneline.models.family import detect_family
    from tuneline.models.registry import build_adapter
    from tuneline.train.adapter import DiffusionAdapter, ModelSource
    from tuneline.train.trainer import Trainer
    from tuneline.train.validation import Validation

    if adapter is None:  # first: a setting the family refuses fails before any data is read
        adapter = build_adapter(detect_family(params.model, root), params.model, params.train, root)
    data = latent_data(params, latents_dir)
    settings = params.train.validation
    # The train stage's adapters are the diffusion families' (build_adapter of a family).
    validation = (Validation(settings, cast(DiffusionAdapter, adapter), data)
                  if settings.every_steps and data.validation else None)
    trainer = Trainer(params.train, adapter, data, ModelSource.of(params.model, root), checkpoint_dir,
                      resume_from=resume_from, live_eval=live_eval, live_every=live_every, validation=validation)
    if settings.every_steps and not data.validation:
        trainer.messages.append(f"train.validation.every_steps is {settings.every_steps} but no data set holds items "
                                "out (datasets[].validation): no validation loss is computed")
    return trainer


def variant_notes(params: Params, root: Path, trainer: Trainer, report: StageReport) -> str:
    """model.base's variant (for the report); training a step-distilled one without a training adapter adds
    one warning with the fix to the trainer's messages (shown as training starts, and in the report)."""
    from tuneline.models.family import get_family
    from tuneline.models.variant import resolve_variant, training_warning

    family = get_family(trainer.adapter.family)
    choice = resolve_variant(params.model, family, root)
    warning = training_warning(choice, params.model, params.train, family)
    if warning:
        trainer.messages.append(warning)
    adapter = params.model.training_adapter
    report.extra["training_adapter"] = adapter.ref if adapter is not None else None
    return choice.variant.name


def run(params: Params, root: Path, latents_dir: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None, checkpoint_dir: Path | None = None, resume_from: Path | None = None) -> StageReport:
    """Train (or resume), then write the result. Raises StopRequested / TrainingDiverged / ResumeRefused."""
    started = time.perf_counter()
    checkpoint_dir = checkpoint_dir or Path(root) / layout.CHECKPOINTS
    report = StageReport(STAGE, metric_keys=("steps", "loss", "seconds_per_step", "val_loss_best",
                                             "val_loss_best_step"))
    if is_tiny(params.model.base):
        report.warnings.append(f"model.base is {params.model.base!r}: a tiny RANDOM-weight model "
                               "(pipeline check only, the result means nothing)")
    trainer = build_trainer(params, root, latents_dir, checkpoint_dir, resume_from=resume_from,
                            live_eval=LiveEvaluation(params, root, tracker), live_every=params.render.live_every)
    trainer.setup()
    variant = variant_notes(params, root, trainer, report)
    main = trainer.accelerator.is_main_process
    # The run's whole loss history lives with its checkpoints, which DVC never deletes (it deletes
    # declared outputs such as metrics/train_loss.csv before a stage runs); the metrics files are
    # drawn from it, rewritten at the end of every session.
    curve = (LossCurve(trainer.checkpoint_dir / LOSS_CURVE, trainer.state.step,
                       structure_columns(params) + prior_columns(params)) if main else None)
    names = trainer.validation.metric_names() if trainer.validation is not None else []
    validation_curve = (ValidationCurve(trainer.checkpoint_dir / VALIDATION_CURVE, trainer.state.step, names)
                        if main else None)
    mlflow_run_id = track_training_run(trainer, tracker) if main else None
    if tracker is not None:
        tracker.log_params({"train": params.train.model_dump(mode="json"), "model": params.model.model_dump(mode="json"),
                            "seed_used": trainer.seed, "data_digest": trainer.data_digest,
                            "processes": trainer.accelerator.num_processes})
    first_step = trainer.state.step
    since = [first_step, time.perf_counter()]  # the step and time of the previous logged row

    def on_log(state: Any, result: Any, seconds_per_step: float) -> None:
        if not main:
            return
        now = time.perf_counter()
        interval = (now - since[1]) / max(1, state.step - since[0])
        since[:] = [state.step, now]
        first_lr = next(iter(result.lrs.values()))
        parts = result.extra  # the per-batch facts and the loss's parts (of the step's last micro-batch)
        curve.add(state.step, result.loss, first_lr, interval, parts)
        if tracker is not None:
            metrics = {"loss": result.loss, "seconds_per_step": seconds_per_step, "epoch": state.epoch,
                       "samples_per_second": result.samples / max(seconds_per_step, 1e-9), **parts}
            metrics |= {f"lr/{name}": lr for name, lr in result.lrs.items()}
            if result.grad_norm is not None:
                metrics["grad_norm"] = result.grad_norm
            if trainer.accelerator.scaler is not None:
                metrics["amp_scale"] = trainer.accelerator.scaler.get_scale()
            tracker.log_metrics(metrics, step=state.step)

    def on_validate(state: Any, metrics: dict[str, float]) -> None:
        if not main:
            return
        validation_curve.add(state.step, metrics)
        best = f", best {state.best_validation_loss:.6f} at step {state.best_validation_step}"
        trainer.accelerator.print(f"step {state.step}: validation loss {metrics['val/loss']:.6f}{best}")
        if tracker is not None:
            tracker.log_metrics(metrics, step=state.step)

    try:
        summary = trainer.fit(on_log, on_validate)
    finally:
        if curve is not None:
            curve.close()
            plots_dir = Path(metrics_dir or out_dir)
            atomic_write_bytes(plots_dir / LOSS_CURVE, curve.tracked_csv())
            atomic_write_bytes(plots_dir / VALIDATION_CURVE, validation_curve.tracked_csv())
            picture = write_loss_curve_png(curve.rows, plots_dir / LOSS_PICTURE, f"train run {trainer.run_key}",
                                           validation_curve.rows)
            if tracker is not None and trainer.state.step > first_step:  # an idle session records nothing
                tracker.log_artifact(picture, STAGE)
            # After a finished or stopped session that trained and saved steps (a session that trained
            # nothing changes nothing here either: the record stays the bytes DVC recorded).
            if trainer.state.step > first_step and trainer.saved_at_current_step():
                write_run_record(trainer, mlflow_run_id)
    if main:
        with rebuilt_dir(out_dir) as staging:
            trainer.save_outputs(staging)
            live = live_dir(trainer)
            if live.is_dir():  # this run's samples, kept with its checkpoints across resumes
                shutil.copytree(live, staging / LIVE_DIR)
            state = trainer.state.to_json()
            del state["history"]  # wall-clock times and MLflow run ids: in the run record (RUN_RECORD)
            # A DVC output: only what the run's inputs and its steps decide (no times, no run ids).
            atomic_write_json(staging / TRAINER_STATE, {
                **state, "seed_used": trainer.seed, "data_digest": trainer.data_digest,
                "train_config": params.train.model_dump(mode="json"), "model": params.model.model_dump(mode="json"),
                "random_tiny_model": is_tiny(params.model.base), "family": trainer.adapter.family,
                "prediction_type": trainer.adapter.prediction_type,
                "processes": trainer.accelerator.num_processes,
                # Names the run's checkpoint folder, where its run record is (`<checkpoints>/<run_key>/run.json`).
                "run_key": trainer.run_key,
                "ema_weights": trainer.ema is not None,
                "best_weights": (staging / BEST_DIR).is_dir()})
    else:
        trainer.save_outputs(out_dir)  # joins the barrier; only the main process writes
    report.computed = summary["session_steps"]
    report.reused = summary["steps"] - summary["session_steps"]
    report.extra.update({"steps": summary["steps"], "epochs": summary["epochs"], "seed": summary["seed"],
                         "run_key": trainer.run_key, "variant": variant,
                         # From the run's history (the same after a session that trained nothing):
                         "loss": curve.last_loss() if curve else None,
                         "seconds_per_step": curve.seconds_per_step() if curve else None,
                         # This session only:
                         "session_final_loss": summary["final_loss"],
                         "session_seconds_per_step": round(summary["seconds_per_step"], 4)})
    if trainer.state.best_validation_step:
        report.extra.update({"val_loss_best": trainer.state.best_validation_loss,
                             "val_loss_best_step": trainer.state.best_validation_step})
    report.warnings.extend(trainer.messages)
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None and main:
        report.write_metrics(metrics_dir)
    return report
