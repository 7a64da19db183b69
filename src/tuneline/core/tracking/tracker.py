"""MLflow tracking for stages and the trainer: one child run per stage under one parent
run per pipeline run.

    with Tracker.start(params.tracking, root, run_name="train", stage="train") as tracker:
        tracker.log_params(params)
        tracker.log_metrics({"loss": 0.1}, step=10)

A disabled tracker, or one started outside the main process, is a `NullTracker` whose
methods do nothing, so callers never branch on whether tracking is on. mlflow is
imported inside functions: importing this module stays cheap.

The MLflow run starts at the first thing worth recording (a metric, an image, an
artifact, `begin()`, or a failure): a stage that finds nothing to do imports no mlflow
(seconds per process) and leaves no empty run. Params and tags given before are kept
and logged when it starts, and the run's start time is the tracker's (the stage's start),
so its duration covers the work done before the first record.

One-value facts of a run (a stage's report: items computed, seconds) are tags
(`log_facts`), not metrics: MLflow would chart each as a one-bar chart ahead of the curves.

One training run is one MLflow run: `continue_run(run_id)` makes the tracker reopen that
run (status RUNNING again, same curve) instead of creating one, so a resumed or a
SIGKILLed-then-restarted training run keeps a single loss curve.

Parent runs: a pipeline driver (DVC wrapper, Prefect flow) calls `start_parent_run`,
exports the id as TUNELINE_PARENT_RUN_ID, and every stage started under it becomes a
child run (MLflow's `mlflow.parentRunId` tag) without passing the id around.
`end_parent_run` deletes a parent under which nothing ran (every stage a cache hit or a
no-op), so the UI lists no empty pipeline runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.core.tracking.config import TrackingConfig

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "PARENT_RUN_ENV",
    "NullTracker",
    "MlflowTracker",
    "Tracker",
    "TrackingConfig",
    "end_parent_run",
    "flatten_params",
    "git_commit",
    "start_parent_run",
]

_logger = logging.getLogger(__name__)

PARENT_RUN_ENV = "TUNELINE_PARENT_RUN_ID"
STAGE_TAG = "tuneline.stage"
GIT_COMMIT_TAG = "tuneline.git_commit"
# Set on a pipeline run whose session continued an earlier stage run (a resumed training run
# stays the child of the pipeline run that started it): the parent is then not empty.
CONTINUED_TAG = "tuneline.continued_run"
# One-value run facts (a stage's report), as tags: tuneline.report.computed = 12.
FACT_TAG_PREFIX = "tuneline.report."
# MLflow 3's UI shows an experiment of this kind in its model-training view (runs, metrics,
# charts) instead of the GenAI one ("Evaluation runs", traces).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"

# MLflow's own limits (mlflow.utils.validation); repeated here so flattening needs no mlflow import.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250

# MLflow rejects keys with other characters; a data set name or dict key may hold any.
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")


def _quiet_environment() -> None:
    """Keep MLflow off the network: no telemetry. Must run before the first `import mlflow`,
    which reads these variables once (mlflow.telemetry.utils)."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # MLflow's own stderr handler prints INFO lines (database set-up, system metrics) in every
    # process that tracks, the flow's driver included: its records go to the process's logging
    # set-up instead (a stage's log file, see tuneline.core.logs).
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    # The cross-tool convention is DO_NOT_TRACK=1; MLflow 3.17 itself only honours "true",
    # which is why MLFLOW_DISABLE_TELEMETRY above is the one that matters for MLflow.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if "mlflow" in sys.modules:
        # Imported earlier by someone else: re-evaluate, which drops the telemetry client.
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()


def _mlflow():
    _quiet_environment()
    import mlflow

    return mlflow


def _git(root: Path, *args: str) -> str | None:
    """stdout of `git <args>` in root, or None (not a repo, no git)."""
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def git_commit(root: Path) -> str:
    """HEAD's commit of the repository holding root, or "unknown" (not a repo, no git)."""
    commit = (_git(root, "rev-parse", "HEAD") or "").strip()
    return commit or "unknown"


def git_dirty(root: Path, *paths: str) -> bool | None:
    """Whether tracked files of the repository holding root (only those under `paths`, when given)
    differ from HEAD (`git describe --dirty` semantics: untracked files do not count); None when it
    cannot tell."""
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *paths)
    return None if status is None else bool(status.strip())


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    # JSON so lists, None and booleans read the same as in params.yaml (null, true, [..]).
    return json.dumps(value, default=str, ensure_ascii=False)


# MLflow 3.17 lays out a run's charts by key (read in its UI: RunsChartsCardConfig): a section per prefix
# before the last "/", named sections sorted by name, then the unprefixed "Model metrics"; within a
# section, by key. So the loss goes into section "loss" (first: before "lr", "val", "Model metrics"),
# training before validation, and the loss's parts into their own section after it.
CHART_KEYS = {"loss": "loss/train", "val/loss": "loss/validation"}
LOSS_PARTS_PREFIX, LOSS_PARTS_SECTION = "loss/", "loss parts/"


def chart_key(key: str) -> str:
    """The MLflow key of one of tuneline's metric names (see CHART_KEYS); others keep their name."""
    if key in CHART_KEYS:
        return CHART_KEYS[key]
    if key.startswith(LOSS_PARTS_PREFIX):
        return LOSS_PARTS_SECTION + key.removeprefix(LOSS_PARTS_PREFIX)
    return key


def _key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)[:MAX_KEY_LENGTH]


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings and pydantic models -> {"train.lora.rank": "16", ...}.

    Lists stay one JSON value (indices as keys would be unreadable); every value is cut
    to MLflow's 6000-character limit so one long prompt list never fails the whole batch.
    """
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    flat: dict[str, str] = {}
    for name, value in params.items():
        key = f"{prefix}{name}"
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{key}."))
        else:
            flat[_key(key)] = _param_value(value)[:MAX_PARAM_VALUE_LENGTH]
    return flat


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """What stages and the trainer log through. `Tracker.start` picks the implementation;
    this base is the no-op behaviour every method falls back to."""

    @classmethod
    def start(
        cls,
        config: TrackingConfig,
        root: Path,
        run_name: str,
        stage: str,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        is_main_process: bool = True,
    ) -> "Tracker":
        """Start a run (a child run when a parent is given or TUNELINE_PARENT_RUN_ID is set).

        Returns a `NullTracker` when tracking is disabled or this is not the main process:
        with several training processes only one may write the run.
        """
        if not config.enabled or not is_main_process:
            return NullTracker()
        return MlflowTracker._start(config, Path(root), run_name, stage, dict(tags or {}), parent_run_id)

    @property
    def active(self) -> bool:
        """True when calls really log (lets callers skip work such as rendering eval images)."""
        return False

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (starts the run); None when not tracking."""
        return None

    @property
    def started(self) -> bool:
        """True once the MLflow run exists (something was recorded)."""
        return False

    def link(self, base: str | None = None) -> str | None:
        """The run's page in MLflow's model-training view (base: the UI's address, default the tracking
        server or `tuneline ui`'s); None when no run was made."""
        return None

    def begin(self) -> None:
        """Start the run now (e.g. a training session that will train), not at the first log call."""

    def continue_run(self, run_id: str | None) -> None:
        """Reopen this earlier run when the run starts, instead of creating a new one (the same
        training run resumed). A run that no longer exists is replaced by a new one, with a warning."""

    def end_orphans(self, run_ids: list[str]) -> None:
        """Mark these runs KILLED where they are still RUNNING (their process died without ending them)."""

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Log nested params flattened to dotted keys. MLflow params are write-once:
        logging a key again with a different value is an error."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at a step; non-finite values are skipped (warned about once)."""

    def log_image(self, image: "Image.Image", artifact_path: str) -> None:
        """Save a PIL image as the artifact file artifact_path (e.g. eval/step_000100/prompt_0.png)."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under artifact_path (None: the run's root)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values become strings)."""

    def log_facts(self, facts: Mapping[str, Any]) -> None:
        """Record one-value facts of the run (a stage's report) as `tuneline.report.<key>` tags: a
        rerun of a continued run overwrites them, and MLflow charts only the real curves."""
        self.set_tags({f"{FACT_TAG_PREFIX}{key}": _fact_value(value) for key, value in facts.items()})

    def end(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED; later calls do nothing."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self.end(_status_for(exc_type, exc))
        return False  # never swallow the exception


class NullTracker(Tracker):
    """Tracking off, or not the main process: accepts every call and does nothing."""


def _fact_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return _param_value(value)


def _status_for(exc_type: type[BaseException] | None, exc: BaseException | None) -> str:
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, SystemExit):
        return "FINISHED" if getattr(exc, "code", None) in (0, None) else "FAILED"
    if issubclass(exc_type, Exception):
        return "FAILED"
    # KeyboardInterrupt, and cancellation signals raised as BaseException (e.g. Prefect's).
    return "KILLED"


def _experiment_id(client, config: TrackingConfig, root: Path) -> str:
    """Get or create the experiment; its artifact location is only chosen at creation."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        try:
            return client.create_experiment(config.experiment, artifact_location=config.resolved_artifact_root(root),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            # Another stage (parallel Prefect task) created it between the two calls.
            experiment = client.get_experiment_by_name(config.experiment)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        # A deleted experiment keeps its name reserved; bring it back rather than fail.
        client.restore_experiment(experiment.experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by us or by hand: a training experiment
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _standard_tags(root: Path, stage: str, tags: Mapping[str, Any]) -> dict[str, str]:
    merged = {STAGE_TAG: stage, GIT_COMMIT_TAG: git_commit(root)}
    merged.update({_key(str(k)): str(v)[:MAX_TAG_VALUE_LENGTH] for k, v in tags.items()})
    return merged


class MlflowTracker(Tracker):
    """A live MLflow run, created at the first thing worth recording. Started through the
    fluent API so MLflow's own system metrics monitor runs with it; logging goes through an
    MlflowClient with the explicit run id, so it works from any thread."""

    def __init__(self, config: TrackingConfig, root: Path, run_name: str, stage: str, tags: dict[str, Any],
                 parent_run_id: str | None) -> None:
        self._config, self._root, self._run_name, self._stage = config, Path(root), run_name, stage
        self._tags, self._parent_run_id = dict(tags), parent_run_id
        self._pending_params: dict[str, str] = {}
        self._continue_id: str | None = None
        self._client: Any = None
        self._run_id: str | None = None
        self._ended = False
        self._warned_non_finite = False
        # A run created later starts here: its duration covers the stage's work before the first record.
        self._opened_ms = _now_ms()
        self._experiment_id: str | None = None

    @classmethod
    def _start(cls, config: TrackingConfig, root: Path, run_name: str, stage: str, tags: dict[str, Any],
               parent_run_id: str | None) -> "MlflowTracker":
        return cls(config, root, run_name, stage, tags, parent_run_id)

    @property
    def started(self) -> bool:
        return self._run_id is not None

    def continue_run(self, run_id: str | None) -> None:
        if self.started:
            raise RuntimeError("continue_run must be called before the run starts")
        self._continue_id = run_id or None

    def begin(self) -> None:
        if self._run_id is not None or self._ended:
            return
        mlflow = _mlflow()
        from mlflow import MlflowClient

        uri = self._config.resolved_tracking_uri(self._root)
        # Process-wide: the fluent run and the system metrics monitor read the global URI.
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        experiment_id = _experiment_id(client, self._config, self._root)
        parent_run_id = self._parent_run_id if self._parent_run_id is not None else _parent_from_env(client)
        if self._config.system_metrics:
            mlflow.set_system_metrics_sampling_interval(self._config.system_metrics_interval_s)
        tags = _standard_tags(self._root, self._stage, self._tags)
        continued = self._continuable(client, experiment_id)
        if continued is not None:
            # The same run again: RUNNING, its curve continues; it stays the child of the pipeline
            # run that started it, and the current pipeline run names it.
            run = mlflow.start_run(run_id=continued, nested=True, tags=tags, log_system_metrics=self._config.system_metrics)
            if parent_run_id and parent_run_id != run.data.tags.get("mlflow.parentRunId"):
                client.set_tag(parent_run_id, f"{CONTINUED_TAG}.{self._stage}", continued)
        else:
            # Created with the tracker's start time (mlflow.start_run takes none), then made this thread's
            # active run so MLflow's system metrics monitor samples it. A run already active in this
            # thread (a notebook, a flow) is the parent when none is given.
            from mlflow.tracking.context import registry as context_registry
            from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

            active = mlflow.active_run()
            parent_run_id = parent_run_id or (active.info.run_id if active is not None else None)
            tags[MLFLOW_RUN_NAME] = self._run_name
            if parent_run_id:
                tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            created = client.create_run(experiment_id, start_time=min(self._opened_ms, _now_ms()),
                                        tags=context_registry.resolve_tags(tags), run_name=self._run_name)
            run = mlflow.start_run(run_id=created.info.run_id, nested=True,
                                   log_system_metrics=self._config.system_metrics)
        self._client, self._run_id, self._experiment_id = client, run.info.run_id, experiment_id
        if self._pending_params:
            self._write_params(self._pending_params, existing=run.data.params if continued else {})
            self._pending_params = {}

    def _continuable(self, client, experiment_id: str) -> str | None:
        if not self._continue_id:
            return None
        try:
            earlier = client.get_run(self._continue_id)
        except Exception as error:  # another database, a malformed id
            _logger.warning("cannot continue MLflow run %s (%s): starting a new run", self._continue_id, error)
            return None
        if earlier.info.lifecycle_stage == "deleted" or earlier.info.experiment_id != experiment_id:
            _logger.warning("cannot continue MLflow run %s (deleted or in another experiment): starting a new run",
                            self._continue_id)
            return None
        return self._continue_id

    def _write_params(self, flat: Mapping[str, str], existing: Mapping[str, str]) -> None:
        """MLflow params are write-once: a continued run logs only new keys, and a changed value
        (num_steps raised for a resume) as a tag."""
        from mlflow.entities import Param

        new = [Param(key, value) for key, value in flat.items() if key not in existing]
        changed = {f"changed_param.{key}": f"{existing[key]} -> {value}" for key, value in flat.items()
                   if key in existing and existing[key] != value}
        for batch in _chunks(new, MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=batch)
        if changed:
            self.set_tags(changed)

    @property
    def active(self) -> bool:
        return not self._ended

    def link(self, base: str | None = None) -> str | None:
        from tuneline.core.tracking.links import run_url, ui_base

        if self._run_id is None or self._experiment_id is None:
            return None
        return run_url(base or ui_base(self._config), self._experiment_id, self._run_id)

    @property
    def run_id(self) -> str | None:
        self.begin()  # after end(): the run's id, or None when nothing was recorded
        return self._run_id

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        flat = flatten_params(params)
        if not self.started:
            self._pending_params.update(flat)
            return
        existing = self._client.get_run(self._run_id).data.params if self._continue_id else {}
        self._write_params(flat, existing)

    def end_orphans(self, run_ids: list[str]) -> None:
        self.begin()
        for run_id in run_ids:
            try:
                if run_id != self._run_id and self._client.get_run(run_id).info.status == "RUNNING":
                    self._client.set_terminated(run_id, "KILLED")
            except Exception as error:  # gone, or another database: nothing to end
                _logger.debug("not ending run %s: %s", run_id, error)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        timestamp, finite, skipped = _now_ms(), [], []
        for key, value in metrics.items():
            value = float(value)  # also takes 0-d tensors and numpy scalars
            if math.isfinite(value):
                finite.append((_key(chart_key(key)), value))
            else:
                skipped.append(key)
        if skipped and not self._warned_non_finite:
            # Once per run: a diverged loss would otherwise warn at every step.
            _logger.warning("not logging non-finite metric values (first: %s at step %s)", skipped, step)
            self._warned_non_finite = True
        if not finite:
            return
        self.begin()
        from mlflow.entities import Metric

        batch = [Metric(key, value, timestamp, step or 0) for key, value in finite]
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=chunk)

    def log_image(self, image: "Image.Image", artifact_path: str) -> None:
        self.begin()
        self._client.log_image(self._run_id, image, artifact_file=artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.begin()
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self._run_id, str(path), artifact_path)

    def log_facts(self, facts: Mapping[str, Any]) -> None:
        self.begin()  # facts are worth a run, as metrics were
        super().log_facts(facts)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.started:
            self._tags.update(tags)
            return
        from mlflow.entities import RunTag

        batch = [RunTag(_key(str(k)), str(v)[:MAX_TAG_VALUE_LENGTH]) for k, v in tags.items()]
        for chunk in _chunks(batch, MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=chunk)

    def end(self, status: str = "FINISHED") -> None:
        if self._ended:
            return
        if not self.started:
            if status == "FINISHED":  # nothing was recorded: no run at all
                self._ended = True
                return
            self.begin()  # a failure or a stop is worth a record, even of a stage that logged nothing
        self._ended = True
        mlflow = _mlflow()
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self._run_id:
            # end_run also stops and flushes this run's system metrics monitor.
            mlflow.end_run(status)
        else:
            # Ended from another thread, or a run opened inside ours is still on top of the
            # stack: terminate ours directly; its monitor stops at its next sample.
            self._client.set_terminated(self._run_id, status)


def _parent_from_env(client) -> str | None:
    """TUNELINE_PARENT_RUN_ID, if it names a run of this store. A stale id (from another
    database or a deleted run) must not stop a stage: the run is then top-level."""
    run_id = os.environ.get(PARENT_RUN_ENV, "").strip()
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception as error:  # MlflowException, or a malformed id
        _logger.warning("ignoring %s=%s: %s", PARENT_RUN_ENV, run_id, error)
        return None
    if run.info.lifecycle_stage == "deleted":
        _logger.warning("ignoring %s=%s: the run is deleted", PARENT_RUN_ENV, run_id)
        return None
    return run_id


def start_parent_run(
    config: TrackingConfig, root: Path, run_name: str, tags: Mapping[str, Any] | None = None
) -> str | None:
    """Create the parent run of one pipeline run and return its id (None when tracking is off).

    The run is created without becoming this process's active run, so stages run in the
    same process (Prefect tasks) can still start their own runs. Export the id as
    TUNELINE_PARENT_RUN_ID for stages started as subprocesses (DVC).
    """
    if not config.enabled:
        return None
    _mlflow()
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    root = Path(root)
    client = MlflowClient(config.resolved_tracking_uri(root))
    experiment_id = _experiment_id(client, config, root)
    run_tags = _standard_tags(root, "pipeline", tags or {})
    run_tags[MLFLOW_RUN_NAME] = run_name
    run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
    return run.info.run_id


def end_parent_run(config: TrackingConfig, root: Path, run_id: str | None, status: str = "FINISHED",
                   tags: Mapping[str, str] | None = None) -> bool:
    """End a run made by `start_parent_run` with FINISHED, FAILED or KILLED, adding `tags` (what was
    known only once stages ran). A finished parent under which nothing was recorded (every stage a
    cache hit or a no-op) is deleted instead: returns False then, True when the run was kept."""
    if not config.enabled or not run_id:
        return False
    _mlflow()
    from mlflow import MlflowClient

    client = MlflowClient(config.resolved_tracking_uri(Path(root)))
    if status == "FINISHED" and _ran_nothing(client, run_id):
        client.delete_run(run_id)  # soft delete: hidden in the UI, `mlflow gc` removes it
        return False
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)
    return True


def _ran_nothing(client, run_id: str) -> bool:
    run = client.get_run(run_id)
    if any(key.startswith(CONTINUED_TAG + ".") for key in run.data.tags):
        return False
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                                  max_results=1)
    return not children


def run_link(config: TrackingConfig, root: Path, run_id: str | None) -> str | None:
    """The page of a run (e.g. a pipeline's parent run) in MLflow's model-training view; None without one."""
    if not config.enabled or not run_id:
        return None
    _mlflow()
    from mlflow import MlflowClient

    from tuneline.core.tracking.links import run_url, ui_base

    try:
        experiment_id = MlflowClient(config.resolved_tracking_uri(Path(root))).get_run(run_id).info.experiment_id
    except Exception as error:  # a link is a convenience: never fail a pipeline over it
        _logger.debug("no link for run %s: %s", run_id, error)
        return None
    return run_url(ui_base(config), experiment_id, run_id)
