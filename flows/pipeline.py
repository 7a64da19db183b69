"""The pipeline as a Prefect flow: one task per dvc.yaml stage, in data-flow order.

    from flows.pipeline import pipeline
    pipeline(overrides={"train.lr": 1e-4, "train.num_steps": 50})

Each task runs the same stage function as `dvc repro`, as the same command
(`python -m tuneline.cli --params <file> --root <root> <stage>`) in its own process group
(tuneline.orchestration.runner): cancelling the flow run, Ctrl-C or SIGTERM sends one
SIGTERM to the stage's group, the trainer saves a checkpoint and exits 143, and the next
run resumes from it.

Caching: a task's key is a digest of its inputs' content, its params subset and its code
(tuneline.orchestration.cachekey, read from dvc.yaml); results and cache records live in
<root>/.tuneline/prefect. An unchanged rerun is all cache hits: no stage process starts.

Tracking: one MLflow parent run per flow run; every stage process is a child of it
(TUNELINE_PARENT_RUN_ID).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task

from tuneline.orchestration.overrides import overrides_model

ParamsOverrides = overrides_model()

# Stages that want an accelerator; their tasks carry the "gpu" tag (see ensure_gpu_limit).
GPU_STAGES = frozenset({"caption", "latents", "train", "render"})
GPU_TAG = "gpu"
RESULTS_BLOCK_PREFIX = "tuneline-results-"


def _gpu_count() -> int:
    """GPUs visible to the stages (nvidia-smi; no torch import in the driver); at least 1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
            return max(1, sum(1 for line in done.stdout.splitlines() if line.startswith("GPU ")))
        except (OSError, subprocess.SubprocessError):
            pass
    return 1


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
              parent_run_id: Optional[str] = None) -> dict[str, Any]:
    """Run one stage as a subprocess in its own process group; record its outputs under the key."""
    import json

    from tuneline.orchestration.cachekey import STATE_DIR, output_fingerprint, write_record
    from tuneline.orchestration.runner import run_stage_process
    from tuneline.orchestration.spec import StageSpec
    from tuneline.tracking import PARENT_RUN_ENV

    logger = get_run_logger()
    root_path = Path(root)
    running = root_path / STATE_DIR / "running" / f"{stage}.pid"
    running.parent.mkdir(parents=True, exist_ok=True)
    env = {PARENT_RUN_ENV: parent_run_id} if parent_run_id else {}

    def started(pgid: int) -> None:
        running.write_text(f"{pgid}\n")  # the stage's process group, for tools and tests
        logger.info("stage %s: process group %d", stage, pgid)

    try:
        run_stage_process(stage, Path(params_file), root_path, env=env, on_start=started, echo=logger.info)
    finally:
        running.unlink(missing_ok=True)
    spec = StageSpec(stage, "", (), (), (), tuple(outs))
    fingerprint = output_fingerprint(spec, root_path)
    write_record(root_path, stage, cache_key, fingerprint)
    metrics_file = root_path / "metrics" / f"{stage}.json"
    metrics = json.loads(metrics_file.read_text("utf-8")) if metrics_file.is_file() else None
    return {"stage": stage, "key": cache_key, "outputs": fingerprint, "metrics": metrics}


def _status_of(error: BaseException) -> str:
    from tuneline.orchestration.runner import STOPPED_EXIT_CODE, StageProcessFailed

    if isinstance(error, StageProcessFailed):
        return "KILLED" if error.returncode == STOPPED_EXIT_CODE else "FAILED"
    return "FAILED" if isinstance(error, Exception) else "KILLED"  # KeyboardInterrupt, TerminationSignal


@flow(name="tuneline-pipeline", validate_parameters=False)
def pipeline(params_path: str = "params.yaml", root: str = ".",
             overrides: Optional[ParamsOverrides] = None) -> dict[str, Any]:  # type: ignore[valid-type]
    """Run ingest -> bucket -> caption -> latents -> train -> render -> export with cached tasks.

    Args:
        params_path: The params file, relative to root unless absolute.
        root: The project root (holds dvc.yaml, data/, .tuneline/).
        overrides: Settings that replace params.yaml's for this run, like `dvc exp run -S`:
            nested sections or dotted keys ({"train.lr": 0.0001}). Empty fields keep params.yaml.
    """
    from prefect.runtime import flow_run

    from tuneline.cli import STAGE_RUNNERS
    from tuneline.fsutil import digest_json
    from tuneline.orchestration.cachekey import STATE_DIR, Digester, outputs_match, stage_key
    from tuneline.orchestration.overrides import load_with_overrides, write_params_file
    from tuneline.orchestration.spec import load_stage_specs
    from tuneline.tracking import end_parent_run, start_parent_run

    logger = get_run_logger()
    root_path = Path(root).resolve()
    params_file = Path(params_path) if Path(params_path).is_absolute() else root_path / params_path
    # Bad overrides or params stop here, before any task, with validate_params' message.
    data, params = load_with_overrides(params_file, overrides)
    specs = load_stage_specs(root_path)
    unknown = [spec.name for spec in specs if spec.name not in STAGE_RUNNERS]
    if unknown:
        raise ValueError(f"dvc.yaml stages without a runner in tuneline.cli: {', '.join(unknown)}")
    state_dir = root_path / STATE_DIR
    merged_params = write_params_file(data, state_dir / "params")
    storage = _results_storage(root_path)
    gpu_limit = ensure_gpu_limit()
    if gpu_limit:
        logger.info("concurrency limit tag:%s = %d", GPU_TAG, gpu_limit)

    with Digester(root_path, params.store_dir) as digester:
        data_digest = digest_json({d.name: digester.tree(str(d.path)) for d in params.datasets})
    parent_run_id = start_parent_run(params.tracking, root_path, run_name=f"pipeline {flow_run.get_name() or ''}".strip(),
                                     tags={"tuneline.data_digest": data_digest, "tuneline.orchestrator": "prefect",
                                           "prefect.flow_run_id": flow_run.get_id() or ""})
    summary: dict[str, Any] = {}
    status = "FINISHED"
    try:
        for spec in specs:
            with Digester(root_path, params.store_dir) as digester:
                key = stage_key(spec, params, root_path, digester)
                valid = outputs_match(root_path, spec, key.key, digester)
            stage_task = run_stage.with_options(
                name=spec.name, task_run_name=spec.name, tags=[GPU_TAG] if spec.name in GPU_STAGES else [],
                # Outputs gone or changed since the key's run: run again and overwrite the cache entry.
                refresh_cache=not valid, result_storage=storage, persist_result=True,
            )
            state = stage_task(stage=spec.name, root=str(root_path), params_file=str(merged_params),
                               cache_key=key.key, outs=list(spec.outs), parent_run_id=parent_run_id,
                               return_state=True)
            result = state.result()  # raises the stage's error: the flow stops at a failed stage
            summary[spec.name] = {"cached": state.name == "Cached", "key": key.key,
                                  "metrics": (result or {}).get("metrics")}
            logger.info("stage %s: %s (key %s)", spec.name, "cache hit" if state.name == "Cached" else "ran", key.key)
    except BaseException as error:
        status = _status_of(error)
        raise
    finally:
        end_parent_run(params.tracking, root_path, parent_run_id, status)
    return {"parent_run_id": parent_run_id, "params_file": str(merged_params), "stages": summary}


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

    import yaml

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file, relative to the root")
    parser.add_argument("--root", default=".", help="project root (default: .)")
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting like `dvc exp run -S` (value parsed as YAML); repeatable")
    parser.add_argument("--overrides", default=None, help="overrides as a JSON object (dotted or nested keys)")
    parser.add_argument("--summary", default=None, help="also write the run summary as JSON to this file")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = json.loads(args.overrides) if args.overrides else {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"-S {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from tuneline.config import ParamsError
    from tuneline.orchestration.runner import StageProcessFailed
    from tuneline.report import print_error

    try:
        summary = pipeline(params_path=args.params, root=args.root, overrides=overrides or None)
    except ParamsError as error:
        print_error("configuration error", str(error))
        return 2
    except StageProcessFailed as error:
        print_error("stage failed", str(error))
        return error.returncode if error.returncode in (2, 143) else 1
    text = json.dumps(summary, indent=2, default=str)
    if args.summary:
        Path(args.summary).write_text(text, "utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
