"""The pipeline as a Prefect flow: one task per dvc.yaml stage, in data-flow order.

    from flows.pipeline import pipeline        # = tuneline.orchestration.flow
    pipeline(overrides={"train.lr": 1e-4, "train.num_steps": 50})

Each task runs the same stage function as `dvc repro`, as the same command
(`python -m tuneline.cli --params <file> --root <root> <stage>`) in its own process group
(tuneline.orchestration.runner): cancelling the flow run, Ctrl-C or SIGTERM sends one
SIGTERM to the stage's group, the trainer saves a checkpoint and exits 143, and the next
run resumes from it.

Caching: a task's key is a digest of its inputs' content, its params subset and its code
(tuneline.orchestration.cachekey, read from dvc.yaml); results and cache records live in
<root>/.tuneline/prefect. An unchanged rerun is all cache hits: no stage process starts.

Tracking: one MLflow parent run per flow run; every stage process that records something
is a child of it (TUNELINE_PARENT_RUN_ID). A flow run where nothing ran leaves no run.

Scale-out: with `shards=N` (`--shards N`) the caption and latents steps become N shard
tasks (`python -m tuneline.cli ... <stage> --shard i/N`, each its own process, GPU
i % <GPUs> when there are GPUs) submitted at once through a ThreadPoolTaskRunner, each
filling the shared per-item store (.tuneline/store: content-addressed, atomic writes),
followed by the normal stage task, which assembles the output from the store (all hits).
With `task_runner="dask"` (`--task-runner dask [--dask-address tcp://host:port]`) the shard
tasks go through prefect-dask's DaskTaskRunner to the workers of a local cluster (one per
GPU) or of a running scheduler, after every worker has shown that it sees the item store
(tuneline.orchestration.cluster).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Literal, Optional

# Prefect's temporary server sets up its database on the first run of a fresh PREFECT_HOME,
# which takes 15-30 s on a 2-core machine: more than Prefect's default 20 s start timeout.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402  (after the setting above)

from tuneline.orchestration import registry
from tuneline.orchestration.overrides import SET_TO_NULL, overrides_model

ParamsOverrides = overrides_model()

# Tasks of stages that want an accelerator (registry: gpu=True) carry this tag (see ensure_gpu_limit).
GPU_TAG = "gpu"
FLOW_NAME = "tuneline-pipeline"
RESULTS_BLOCK_PREFIX = "tuneline-results-"


def _gpu_ids() -> list[str]:
    """Ids of the GPUs visible to the stages (CUDA_VISIBLE_DEVICES, else nvidia-smi; no torch
    import in the driver); empty when there are none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        return ids[:ids.index("-1")] if "-1" in ids else ids  # CUDA stops at the first invalid id
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
            return [str(i) for i in range(sum(1 for line in done.stdout.splitlines() if line.startswith("GPU ")))]
        except (OSError, subprocess.SubprocessError):
            pass
    return []


def _gpu_count() -> int:
    """GPUs visible to the stages; at least 1."""
    return max(1, len(_gpu_ids()))


def uses_server() -> bool:
    """True when PREFECT_API_URL names a server (not the ephemeral one Prefect starts itself)."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def ensure_gpu_limit() -> int | None:
    """With a Prefect server: make sure at most <number of GPUs> "gpu"-tagged tasks run at once,
    across all flow runs (Prefect 3 keeps tag limits as the global concurrency limit "tag:gpu").
    Ephemeral mode runs one flow at a time anyway: skipped, returns None."""
    if not uses_server():
        return None
    from prefect.client.orchestration import get_client

    count = _gpu_count()
    try:
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(f"tag:{GPU_TAG}", count)
    except Exception as error:  # a limit is an optimisation; never block the pipeline on it
        get_run_logger().warning("could not set the %r concurrency limit: %s", GPU_TAG, error)
        return None
    return count


def _results_storage(root: Path):
    """Local result storage in the project (cache records follow the project, not PREFECT_HOME).
    Prefect 3 wants the block saved; one block per project root."""
    from prefect.filesystems import LocalFileSystem

    from tuneline.orchestration.cachekey import STATE_DIR

    folder = root / STATE_DIR / "results"
    folder.mkdir(parents=True, exist_ok=True)
    name = RESULTS_BLOCK_PREFIX + hashlib.sha256(str(root).encode()).hexdigest()[:16]
    storage = LocalFileSystem(basepath=str(folder))
    storage.save(name, overwrite=True)
    return storage


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache_key_fn: the content key the flow computed for this stage."""
    return f"tuneline-{parameters['stage']}-{parameters['cache_key']}"


@task(name="stage", cache_key_fn=stage_cache_key, persist_result=True)
def run_stage(stage: str, root: str, params_file: str, cache_key: str, outs: list[str],
              parent_run_id: Optional[str] = None, resume: Optional[str] = None) -> Any:
    """Run one stage as a subprocess in its own process group; record its outputs under the key.
    Stopped on request (a cancel, Ctrl-C, SIGTERM): returns a Cancelled state naming the
    checkpoint and `resume`, the command that resumes this flow run."""
    import json

    from tuneline.core.report import report_path
    from tuneline.core.stops import RESUME_COMMAND_ENV, STOP_RECORD_ENV
    from tuneline.core.tracking.tracker import PARENT_RUN_ENV
    from tuneline.orchestration.cachekey import STATE_DIR, output_fingerprint, write_record
    from tuneline.orchestration.runner import StageStopped, run_stage_process
    from tuneline.orchestration.spec import StageSpec

    logger = get_run_logger()
    root_path = Path(root)
    running = root_path / STATE_DIR / "running" / f"{stage}.pid"
    running.parent.mkdir(parents=True, exist_ok=True)
    stop_record = running.with_suffix(".stopped.json")
    stop_record.unlink(missing_ok=True)
    env = {PARENT_RUN_ENV: parent_run_id} if parent_run_id else {}
    env[STOP_RECORD_ENV] = str(stop_record)
    if resume:
        env[RESUME_COMMAND_ENV] = resume

    def started(pgid: int) -> None:
        running.write_text(f"{pgid}\n")  # the stage's process group, for tools and tests
        logger.info("stage %s: process group %d", stage, pgid)

    try:
        run_stage_process(stage, Path(params_file), root_path, env=env, on_start=started, echo=stage_output(logger))
    except StageStopped as stopped:
        return _stopped(stopped, stop_record, resume, logger)
    finally:
        running.unlink(missing_ok=True)
    spec = StageSpec(stage, "", (), (), (), tuple(outs))
    fingerprint = output_fingerprint(spec, root_path)
    write_record(root_path, stage, cache_key, fingerprint)
    metrics_file = root_path / "metrics" / f"{stage}.json"
    metrics = json.loads(metrics_file.read_text("utf-8")) if metrics_file.is_file() else None
    report_file = report_path(root_path, stage)  # what this run did: computed, reused, seconds, ...
    report = json.loads(report_file.read_text("utf-8")) if report_file.is_file() else None
    return {"stage": stage, "key": cache_key, "outputs": fingerprint, "metrics": metrics, "report": report}


def stage_output(logger: Any, prefix: str = "") -> Callable[[str], None]:
    """A stage's output line -> the run log, at the level the stage wrote it (`warning: ...` at
    WARNING: tuneline.core.logs.level_of), so the UI's level filter shows a stage's warnings."""
    from tuneline.core.logs import level_of

    def echo(line: str) -> None:
        level, text = level_of(line)
        logger.log(level, "%s%s", prefix, text)

    return echo


class OrderlyEnds(logging.Filter):
    """Prefect's own lines about how a run of this flow ended, where the flow chose that end and has
    said why in plain words (added to Prefect's run loggers for the flow runs in `flow_runs`):

    - Prefect logs a task's every end but Completed at ERROR, so a stage stopped on request (a
      cancel: checkpoint saved, resumable) would read as a failure: "Finished in state Cancelled"
      becomes a WARNING.
    - The process that Prefect's runner starts for a deployment's flow run (the UI's Run) logs the
      exception that ends it, at ERROR with a traceback ("Engine execution exited with unexpected
      exception"), even for the Cancelled or Failed state the flow returned: dropped for a cancel
      (CancelledRun) and a configuration error (ParamsError), which the flow has logged already.

    Returning the state is how Prefect lets a flow end Cancelled or Failed without raising; these
    two lines are how Prefect 3.8 logs such an end anyway, so they are adjusted here, for this
    flow's runs only."""

    ENGINE_EXIT = "Engine execution exited with unexpected exception"

    def __init__(self) -> None:
        super().__init__("tuneline")
        self.flow_runs: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if str(getattr(record, "flow_run_id", None)) not in self.flow_runs:
            return True
        if (record.name == "prefect.task_runs" and record.levelno >= logging.ERROR
                and str(record.msg).startswith("Finished in state Cancelled")):
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            return True
        if record.name == "prefect.flow_runs" and record.msg == self.ENGINE_EXIT and record.exc_info:
            from prefect.exceptions import CancelledRun

            from tuneline.core.params import ParamsError

            return not isinstance(record.exc_info[1], (CancelledRun, ParamsError))
        return True

    def watch(self, flow_run_id: Optional[str]) -> None:
        """Adjust the lines of this flow run (Prefect's flow and task run loggers)."""
        if flow_run_id:
            self.flow_runs.add(str(flow_run_id))
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logger = logging.getLogger(name)
            if self not in logger.filters:
                logger.addFilter(self)


ORDERLY_ENDS = OrderlyEnds()


def stopped_flow(state: Any) -> Any:
    """The flow run's end after a stage stopped on request: Cancelled, with the stage's message
    (where it saved), returned rather than raised: an orderly end, not an error."""
    from prefect.states import Cancelled

    return Cancelled(message=state.message)


def refused_flow(error: BaseException, logger: Any, what: str = "configuration error") -> Any:
    """The flow run's end for bad settings (or a Dask cluster that cannot run the shards): Failed,
    with the message said once and plainly (no repr, no traceback); a caller of `pipeline()`
    still gets the ParamsError (ClusterError)."""
    from prefect.states import Failed

    logger.error("%s: %s", what, error)
    return Failed(message=str(error), data=error)


def _stopped(stopped: Any, stop_record: Path, resume: Optional[str], logger: Any) -> Any:
    """A stage stopped on request: an orderly stop, so Cancelled (not Crashed), with where it saved."""
    from prefect.states import Cancelled

    from tuneline.core.stops import read_stop_record

    record = read_stop_record(stop_record)
    stop_record.unlink(missing_ok=True)
    saved = f"; checkpoint {record['checkpoint']}" if record.get("checkpoint") else ""
    message = f"stage {stopped.stage} stopped on request (signal {stopped.signum}){saved}"
    logger.warning("%s. To resume, run: %s", message, resume or "this flow again with the same parameters")
    return Cancelled(message=message)


def shard_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache_key_fn of a shard task: its stage's content key, plus which shard of how many."""
    return f"tuneline-{parameters['stage']}-shard{parameters['index']}of{parameters['count']}-{parameters['cache_key']}"


@task(name="shard", cache_key_fn=shard_cache_key, persist_result=True)
def run_shard(stage: str, index: int, count: int, root: str, params_file: str, cache_key: str,
              gpu: Optional[str] = None, parent_run_id: Optional[str] = None) -> dict[str, Any]:
    """Run `<stage> --shard index/count` as a subprocess in its own process group: it computes
    that shard's missing items into the shared store and writes no output folder."""
    import socket

    from tuneline.orchestration.cachekey import STATE_DIR
    from tuneline.orchestration.runner import run_stage_process
    from tuneline.core.tracking.tracker import PARENT_RUN_ENV

    logger = get_run_logger()
    name = f"{stage} shard {index}/{count}"
    running = Path(root) / STATE_DIR / "running" / f"{stage}.shard{index}of{count}.pid"
    running.parent.mkdir(parents=True, exist_ok=True)
    env = {PARENT_RUN_ENV: parent_run_id} if parent_run_id else {}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu

    def started(pgid: int) -> None:
        # The flow stops these groups when it is cancelled; the host says where (Dask workers
        # on other machines write here too, through the shared project folder).
        running.write_text(f"{pgid}\n{socket.gethostname()}\n")
        logger.info("%s: process group %d%s", name, pgid, f" on GPU {gpu}" if gpu is not None else "")

    to_log = stage_output(logger, prefix=f"[{index}/{count}] ")
    try:
        run_stage_process(stage, Path(params_file), Path(root), env=env, on_start=started, echo=to_log,
                          args=["--shard", f"{index}/{count}"])
    finally:
        running.unlink(missing_ok=True)
    return {"stage": stage, "shard": f"{index}/{count}", "key": cache_key}


def _stop_shards(root: str, stage: str) -> None:
    """SIGTERM the process group of every shard of `stage` still running on this host (the flow is
    stopping; on a Dask cluster every worker runs this too)."""
    import signal
    import socket

    from tuneline.orchestration.cachekey import STATE_DIR

    for pid_file in (Path(root) / STATE_DIR / "running").glob(f"{stage}.shard*.pid"):
        try:
            pgid, *host = pid_file.read_text().split()
            if host and host[0] != socket.gethostname():
                continue  # another machine's process group
            os.killpg(int(pgid), signal.SIGTERM)
        except (OSError, ValueError):
            pass


class ShardLost(RuntimeError):
    """A shard task ended without a state: its Dask worker died (killed, out of memory, machine lost)."""


def run_shards(stage: str, count: int, root: Path, params_file: Path, cache_key: str, valid: bool,
               storage: Any, parent_run_id: Optional[str], dask: Any = None,
               api_url: Optional[str] = None) -> list[dict[str, Any]]:
    """Run `count` shard tasks of `stage` at once, each its own process: one thread each here, or
    on the workers of `dask` (a started DaskTaskRunner; each worker's environment pins its GPU);
    raise the first failure once all have ended. Returns one {"shard", "cached"} per shard.
    `api_url`: the Prefect API the Dask workers report to (the flow's temporary server)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.task_runners import ThreadPoolTaskRunner

    gpus = [] if dask is not None else _gpu_ids()
    shard_task = run_shard.with_options(
        tags=[GPU_TAG] if registry.stage(stage).gpu else [], refresh_cache=not valid,
        result_storage=storage, persist_result=True)
    # The task's context travels to the Dask worker with this process's settings: the API URL in
    # them makes the worker report to this flow's server instead of starting a temporary one.
    settings = temporary_settings({PREFECT_API_URL: api_url}) if api_url else contextlib.nullcontext()
    with contextlib.ExitStack() as stack:
        runner = dask if dask is not None else stack.enter_context(ThreadPoolTaskRunner(max_workers=count))
        with settings:
            futures = [runner.submit(shard_task.with_options(task_run_name=f"{stage}-shard-{i}of{count}"), {
                "stage": stage, "index": i, "count": count, "root": str(root), "params_file": str(params_file),
                "cache_key": cache_key, "gpu": gpus[i % len(gpus)] if gpus else None,
                "parent_run_id": parent_run_id}) for i in range(count)]
        try:
            for future in futures:
                future.wait()
        except BaseException:  # cancelled, Ctrl-C, SIGTERM: the shard processes stop too
            if dask is not None:
                with contextlib.suppress(Exception):
                    dask.client.run(_stop_shards, str(root), stage)
            _stop_shards(str(root), stage)
            raise
    states = []
    for i, future in enumerate(futures):
        if dask is not None:
            try:
                future.result(raise_on_failure=False)  # a lost worker: Dask's KilledWorker, here
            except Exception as error:
                raise ShardLost(
                    f"{stage} shard {i}/{count} was lost with its Dask worker: {error}. The items it stored "
                    "are whole (atomic writes); run the flow again to compute the rest of the shard.") from error
        states.append(future.state)
    for state in states:
        state.result()  # raises the first shard's error
    return [{"shard": f"{i}/{count}", "cached": state.name == "Cached"} for i, state in enumerate(states)]


def _resume_command(params_path: str, root: Path, overrides: Any, shards: int, task_runner: str = "threads",
                    dask_address: Optional[str] = None) -> str:
    """The command that runs this flow run again with the same parameters (and so resumes it):
    `prefect deployment run` for a deployment's run, else `python -m flows.pipeline`."""
    import json
    import shlex

    from prefect.runtime import deployment

    from tuneline.orchestration.overrides import override_args, overrides_dict

    if deployment.get_id():
        parameters: dict[str, Any] = {"overrides": overrides_dict(overrides) or None}
        if shards != 1:
            parameters["shards"] = shards
        if task_runner != "threads":
            parameters["task_runner"] = task_runner
        if dask_address:
            parameters["dask_address"] = dask_address
        return shlex.join(["prefect", "deployment", "run", f"{FLOW_NAME}/{deployment.get_name()}",
                           "--params", json.dumps(parameters)]) + " (or Run in the Prefect UI with the same parameters)"
    args = ["python", "-m", "flows.pipeline", "--root", str(root)]
    if params_path != "params.yaml":
        args += ["--params", params_path]
    args += override_args(overrides)
    if shards != 1:
        args += ["--shards", str(shards)]
    if task_runner != "threads":
        args += ["--task-runner", task_runner]
    if dask_address:
        args += ["--dask-address", dask_address]
    return shlex.join(args)


def _status_of(error: BaseException) -> str:
    from tuneline.orchestration.runner import STOPPED_EXIT_CODE, StageProcessFailed

    if isinstance(error, StageProcessFailed):
        return "KILLED" if error.returncode == STOPPED_EXIT_CODE else "FAILED"
    return "FAILED" if isinstance(error, Exception) else "KILLED"  # KeyboardInterrupt, TerminationSignal


@flow(name=FLOW_NAME, validate_parameters=False)
def pipeline(params_path: str = "params.yaml", root: str = ".",
             overrides: Optional[ParamsOverrides] = None,  # type: ignore[valid-type]
             shards: int = 1, task_runner: Literal["threads", "dask"] = "threads",
             dask_address: Optional[str] = None) -> dict[str, Any]:
    """Run ingest -> bucket -> caption -> latents -> train -> render -> export with cached tasks.

    Args:
        params_path: The params file, relative to root unless absolute.
        root: The project root (holds dvc.yaml, data/, .tuneline/).
        overrides: Settings that replace params.yaml's for this run, like `dvc exp run -S`:
            nested sections or dotted keys ({"train.lr": 0.0001}). Empty (null) fields keep
            params.yaml; list dotted keys in `set_to_null` to set them to null.
        shards: Split caption and latents into this many shard tasks, run at once (each its
            own process, GPUs round robin) into the shared item store, then assemble. 1: no
            sharding (with task_runner "dask": one shard per Dask worker).
        task_runner: Where the shard tasks run: "threads" (this machine, one thread per
            shard) or "dask" (prefect-dask: a local cluster with one worker per GPU, or the
            scheduler at dask_address; every worker must see the project and its store).
        dask_address: A running Dask scheduler to join (tcp://host:port), with task_runner
            "dask"; empty: start a local cluster.
    """
    from prefect.runtime import flow_run

    from tuneline.core.params import ParamsError
    from tuneline.orchestration.cachekey import STATE_DIR, Digester, outputs_match, raw_data_tags, stage_key
    from tuneline.orchestration.overrides import load_with_overrides, write_params_file
    from tuneline.orchestration.spec import load_stage_specs
    from tuneline.core.tracking.tracker import end_parent_run, run_link, start_parent_run
    from tuneline.orchestration.cluster import ClusterError, check_runner
    from tuneline.preflight import check_settings

    logger = get_run_logger()
    ORDERLY_ENDS.watch(flow_run.get_id())  # a cancel and a configuration error read as such in the run log
    if int(shards) < 1:
        raise ValueError(f"shards must be at least 1, got {shards!r}")
    dask_address = (dask_address or "").strip() or None  # the form posts "" for an empty field
    root_path = Path(root).resolve()
    params_file = Path(params_path) if Path(params_path).is_absolute() else root_path / params_path
    # Bad overrides or params stop here, before any task, with validate_params' message; so do
    # settings a later stage would refuse for the model family (train starts after ingest..latents).
    try:
        check_runner(task_runner, dask_address)
        data, params = load_with_overrides(params_file, overrides)
        check_settings(params, root_path)
    except ParamsError as error:
        return refused_flow(error, logger)
    specs = load_stage_specs(root_path)
    unknown = [spec.name for spec in specs if spec.name not in registry.STAGE_NAMES]
    if unknown:
        raise ValueError(f"dvc.yaml stages that tuneline.orchestration.registry does not know: {', '.join(unknown)}")
    state_dir = root_path / STATE_DIR
    merged_params = write_params_file(data, state_dir / "params")
    storage = _results_storage(root_path)
    gpu_limit = ensure_gpu_limit()
    if gpu_limit:
        logger.info("concurrency limit tag:%s = %d", GPU_TAG, gpu_limit)
    resume = _resume_command(params_path, root_path, overrides, shards, task_runner, dask_address)
    cluster = contextlib.ExitStack()
    dask_runner, dask_info = None, None
    if task_runner == "dask" and any(registry.stage(spec.name).shardable for spec in specs):
        try:  # the cluster is up and every worker sees the store before any stage runs
            dask_runner, dask_info = _start_dask(cluster, dask_address, int(shards), root_path,
                                                 root_path / params.store_dir, merged_params, logger)
        except ClusterError as error:
            cluster.close()
            return refused_flow(error, logger, "dask cluster")
        except BaseException:
            cluster.close()
            raise
        shards = dask_info["shards"]

    parent_run_id = start_parent_run(params.tracking, root_path, run_name=f"pipeline {flow_run.get_name() or ''}".strip(),
                                     tags={"tuneline.orchestrator": "prefect", "prefect.flow_run_id": flow_run.get_id() or ""})
    if parent_run_id:
        logger.info("MLflow run of this pipeline: %s", run_link(params.tracking, root_path, parent_run_id))
    summary: dict[str, Any] = {}
    status = "FINISHED"
    kept = False
    try:
        for spec in specs:
            with Digester(root_path, params.store_dir) as digester:
                key = stage_key(spec, params, root_path, digester)
                valid = outputs_match(root_path, spec, key.key, digester) and not spec.always_changed
            shard_states = None
            if (shards > 1 or dask_runner is not None) and registry.stage(spec.name).shardable:
                shard_states = run_shards(spec.name, int(shards), root_path, merged_params, key.key, valid,
                                          storage, parent_run_id, dask=dask_runner,
                                          api_url=dask_info["api_url"] if dask_info else None)
            stage_task = run_stage.with_options(
                name=spec.name, task_run_name=spec.name, tags=[GPU_TAG] if registry.stage(spec.name).gpu else [],
                # Outputs gone or changed since the key's run: run again and overwrite the cache entry.
                refresh_cache=not valid, result_storage=storage, persist_result=True,
            )
            state = stage_task(stage=spec.name, root=str(root_path), params_file=str(merged_params),
                               cache_key=key.key, outs=list(spec.outs), parent_run_id=parent_run_id,
                               resume=resume, return_state=True)
            if state.is_cancelled():  # stopped on request, checkpoint saved: the flow run ends Cancelled too
                status = "KILLED"
                return stopped_flow(state)
            result = state.result()  # raises the stage's error: the flow stops at a failed stage
            cached = state.name == "Cached"
            # A cache hit ran nothing: the cached result's metrics belong to the run that made the outputs.
            summary[spec.name] = {"cached": cached, "key": key.key,
                                  "metrics": None if cached else (result or {}).get("metrics"),
                                  "report": None if cached else (result or {}).get("report")}
            if shard_states is not None:
                summary[spec.name]["shards"] = shard_states
            logger.info("stage %s: %s (key %s)", spec.name, "cache hit" if state.name == "Cached" else "ran", key.key)
    except BaseException as error:
        status = _status_of(error)
        raise
    finally:
        # A run where every stage was a cache hit or a no-op leaves no (empty) parent run.
        # The raw data as the scan stage listed it (the flow walks the raw folders once: in scan).
        kept = end_parent_run(params.tracking, root_path, parent_run_id, status, tags=raw_data_tags(root_path))
        cluster.close()  # a local cluster's workers and scheduler stop here
    result = {"parent_run_id": parent_run_id if kept else None, "params_file": str(merged_params), "stages": summary}
    if dask_info:
        result["dask"] = {"workers": dask_info["workers"], "shards": dask_info["shards"]}
    return result


def _start_dask(stack: Any, address: Optional[str], shards: int, root: Path, store_dir: Path, params_file: Path,
                logger: Any) -> tuple[Any, dict[str, Any]]:
    """Start (or join) the Dask cluster in `stack`, check every worker reaches the Prefect API and sees
    the item store; the started DaskTaskRunner and {"shards", "workers", "api_url"}."""
    from prefect.context import FlowRunContext
    from prefect.settings import get_current_settings

    from tuneline.orchestration.cluster import (check_api_reachable, check_shared_store, dask_task_runner,
                                                start_client)

    gpus = _gpu_ids()
    # The API the shard tasks report to: the server's, or this flow's temporary server (PREFECT_API_URL
    # unset), which only a local cluster's workers can be told about (their environment, run_shards).
    server = str(get_current_settings().api.url).rstrip("/") if uses_server() else None
    api_url = server or str(FlowRunContext.get().client.api_url).rstrip("/")
    # A local cluster: one worker per GPU; without GPUs one per shard (--shards 1: two).
    runner = stack.enter_context(dask_task_runner(address, workers=shards if shards > 1 else 2, gpus=gpus,
                                                  api_url=None if address else api_url))
    client = start_client(runner, address)
    check_api_reachable(client, server if address else api_url)
    views = check_shared_store(client, store_dir, params_file)
    workers = [{"name": v.name, "address": v.address, "host": v.host, "gpu": v.gpu} for v in views]
    for worker in workers:
        logger.info("dask worker %s (%s on %s)%s sees the store %s", worker["name"], worker["address"], worker["host"],
                    f", GPU {worker['gpu']}" if worker["gpu"] is not None else "", store_dir)
    return runner, {"shards": shards if shards > 1 else len(workers), "workers": workers, "api_url": api_url}


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # Prefect re-delivers a raw SIGTERM to the handler that was there before the flow: this
    # one turns it into a normal exit, so atexit runs and Prefect's temporary (ephemeral)
    # server is stopped too instead of being left behind.
    raise SystemExit(143)


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.pipeline [-S train.lr=1e-4 ...]`: run the flow once, print a summary."""
    import argparse
    import json
    import signal

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file, relative to the root")
    parser.add_argument("--root", default=".", help="project root (default: .)")
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting like `dvc exp run -S` (value parsed as YAML; `null` sets null); "
                             "repeatable")
    parser.add_argument("--overrides", default=None, help="overrides as a JSON object (dotted or nested keys)")
    parser.add_argument("--summary", default=None, help="also write the run summary as JSON to this file")
    parser.add_argument("--shards", type=int, default=1, metavar="N",
                        help="run caption and latents as N concurrent shard processes (default: 1, no sharding)")
    parser.add_argument("--task-runner", default="threads", choices=["threads", "dask"],
                        help="where shard tasks run: threads on this machine (default) or a Dask cluster "
                             "(prefect-dask; a local one with one worker per GPU unless --dask-address)")
    parser.add_argument("--dask-address", default=None, metavar="tcp://HOST:PORT",
                        help="join the Dask scheduler at this address (with --task-runner dask)")
    args = parser.parse_args(argv)
    from tuneline.core.params import ParamsError
    from tuneline.orchestration.overrides import parse_set_args

    overrides: dict[str, Any] = json.loads(args.overrides) if args.overrides else {}
    try:
        sets = parse_set_args(args.sets)
    except ParamsError as error:
        parser.error(str(error))
    nulls = sets.pop(SET_TO_NULL, [])
    overrides.update(sets)
    if nulls:
        overrides.setdefault(SET_TO_NULL, []).extend(nulls)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from prefect.exceptions import CancelledRun

    from tuneline.orchestration.cluster import ClusterError
    from tuneline.orchestration.runner import StageProcessFailed
    from tuneline.core.report import print_error

    try:
        summary = pipeline(params_path=args.params, root=args.root, overrides=overrides or None,
                           shards=args.shards, task_runner=args.task_runner, dask_address=args.dask_address)
    except ParamsError as error:
        print_error("configuration error", str(error))
        return 2
    except ClusterError as error:
        print_error("dask cluster", str(error))
        return 2
    except ShardLost as error:
        print_error("shard lost", str(error))
        return 1
    except StageProcessFailed as error:
        print_error("stage failed", str(error))
        return error.returncode if error.returncode in (2, 143) else 1
    except CancelledRun as error:  # stopped on request (SIGTERM, Ctrl-C): the checkpoint is saved
        print_error("stopped", str(error))
        return 143
    text = json.dumps(summary, indent=2, default=str)
    if args.summary:
        Path(args.summary).write_text(text, "utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
