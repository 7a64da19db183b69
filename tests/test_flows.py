"""The Prefect flow, its cache keys, cancellation, the parameter form, `tuneline ui` and `tuneline repro`.

Prefect runs ephemeral (no PREFECT_API_URL) with one PREFECT_HOME for the whole session:
its first run on a fresh home sets up a database (~15 s), later ones take a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import save_photo

REPO = Path(__file__).resolve().parents[1]
FLOW_STAGES = ("models", "ingest", "bucket", "caption", "latents", "train")


@pytest.fixture(scope="session", autouse=True)
def prefect_env(tmp_path_factory):
    """Ephemeral Prefect, quiet, one home per test session (set before prefect is imported)."""
    base = tmp_path_factory.getbasetemp()
    os.environ["PREFECT_HOME"] = str(base / "prefect-home")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # first start on a fresh home: ~25 s
    os.environ.setdefault("TUNELINE_HOME", str(base / "tuneline-home"))
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    yield
    # Prefect stops its temporary server at exit and logs that into pytest's already closed
    # capture stream: harmless, but printed as a logging traceback.
    import logging

    logging.raiseExceptions = False


def child_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def demo_project(root: Path, stages: tuple[str, ...] = FLOW_STAGES) -> Path:
    """A copy of the demo project whose dvc.yaml keeps only `stages` (render/export are
    covered by the DVC test; they would double this test's time)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", ".dvcignore", "prompts.yaml"):
        shutil.copy(REPO / name, root / name)
    for name in ("stages", "src", "data/raw", ".dvc"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    document = yaml.safe_load((REPO / "dvc.yaml").read_text())
    document["stages"] = {name: spec for name, spec in document["stages"].items() if name in stages}
    (root / "dvc.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def run_report(root: Path, stage: str) -> dict:
    """reports/<stage>.json: what the stage's last run did (computed, reused, ...; not tracked by DVC)."""
    return json.loads((root / f"reports/{stage}.json").read_text())


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(processes: list) -> list:
    import psutil

    still = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                still.append(process)
        except psutil.NoSuchProcess:
            pass
    return still


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"exited ({process.returncode}) before {what}:\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{log.read_text()[-4000:] if log else ''}")


# --- fast: specs, keys, overrides, the form ---------------------------------------------------

def test_stage_specs_come_from_dvc_yaml():
    from tuneline.orchestration.registry import STAGE_NAMES
    from tuneline.orchestration.spec import load_stage_specs

    specs = {spec.name: spec for spec in load_stage_specs(REPO)}
    order = list(specs)
    assert order[:len(FLOW_STAGES)] == list(FLOW_STAGES)
    assert set(order) <= set(STAGE_NAMES)
    if {"render", "export"} <= set(order):
        assert order.index("train") < order.index("render") < order.index("export")
    assert specs["bucket"].params == ("datasets", "bucket", "ingest.max_pixels")
    assert "data/ingested" in specs["bucket"].data_deps and "src/tuneline/stages/bucket" in specs["bucket"].code_deps
    assert specs["train"].outs == ("models/train",) and specs["train"].persistent_outs == ("checkpoints/train",)


def test_cache_keys_follow_content_params_and_code(tmp_path):
    from tuneline.config import load_params
    from tuneline.orchestration.cachekey import output_fingerprint, stage_key, write_record
    from tuneline.orchestration.spec import load_stage_specs
    from tuneline.orchestration.cachekey import outputs_match
    from tuneline.orchestration.overrides import apply_overrides

    root = demo_project(tmp_path, ("ingest", "bucket"))
    specs = {spec.name: spec for spec in load_stage_specs(root)}
    data = yaml.safe_load((root / "params.yaml").read_text())
    params = load_params(root / "params.yaml")

    def key(stage: str, p=params) -> str:
        return stage_key(specs[stage], p, root).key

    ingest, bucket = key("ingest"), key("bucket")
    photo = next((root / "data/raw/shapes").glob("*.jpg"))
    os.utime(photo, (1_000_000, 1_000_000))  # touched: same bytes, same key
    assert key("ingest") == ingest
    photo.write_bytes(photo.read_bytes() + b"\0")  # one byte more: new key
    assert key("ingest") != ingest and key("bucket") != bucket  # bucket reads data/raw too
    ingest, bucket = key("ingest"), key("bucket")

    _, lr_changed = apply_overrides(data, {"train.lr": 0.5})
    assert key("ingest", lr_changed) == ingest and key("bucket", lr_changed) == bucket
    _, crop_changed = apply_overrides(data, {"bucket.crop": "random"})
    assert key("ingest", crop_changed) == ingest and key("bucket", crop_changed) != bucket
    _, explicit_default = apply_overrides(data, {"bucket.seed": 0})  # params.yaml's value, written again
    assert key("bucket", explicit_default) == key("bucket")

    code = root / "src/tuneline/stages/bucket/stage.py"
    code.write_text(code.read_text() + "\n# changed\n")
    assert key("bucket") != bucket and key("ingest") == ingest

    # A key is only a hit while its outputs are the ones it recorded.
    spec = specs["ingest"]
    assert not outputs_match(root, spec, ingest)
    (root / "data/ingested").mkdir(parents=True)
    (root / "data/ingested/manifest.jsonl").write_text('{"id": "a"}\n')
    write_record(root, "ingest", ingest, output_fingerprint(spec, root))
    assert outputs_match(root, spec, ingest)
    (root / "data/ingested/manifest.jsonl").write_text('{"id": "b"}\n')
    assert not outputs_match(root, spec, ingest)


def test_overrides_get_the_params_yaml_messages():
    from tuneline.config import validate_params
    from tuneline.core.params import ParamsError
    from tuneline.orchestration.overrides import apply_overrides

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    merged, params = apply_overrides(data, {"train.lr": 1e-4, "train.lora.rank": 4, "bucket": {"crop": "random"}})
    assert (params.train.lr, params.train.lora.rank, params.bucket.crop) == (1e-4, 4, "random")
    assert params.train.num_steps == data["train"]["num_steps"]  # untouched keys keep params.yaml
    with pytest.raises(ParamsError) as from_override:
        apply_overrides(data, {"train.lrr": 1e-4, "bucket.crop": "centre"})
    bad = {**data, "train": {**data["train"], "lrr": 1e-4}, "bucket": {**data["bucket"], "crop": "centre"}}
    with pytest.raises(ParamsError) as from_file:
        validate_params(bad)
    problems = lambda error: str(error.value).splitlines()[1:]  # noqa: E731  (after the source line)
    assert problems(from_override) == problems(from_file)
    assert any("train.lrr: unknown key. Did you mean 'lr'?" in line for line in problems(from_override))


def test_parameter_form_is_params_with_every_field_optional():
    from prefect.utilities.callables import parameter_schema

    from tuneline.orchestration.flow import ParamsOverrides, pipeline
    from tuneline.orchestration.serve import deployment

    schema = parameter_schema(pipeline.fn).model_dump()
    assert {"params_path", "root", "overrides"} <= set(schema["properties"])
    definitions = schema["definitions"]
    train = definitions["TrainConfigOverrides"]["properties"]
    assert "Learning rate" in train["lr"]["description"]
    assert "optimizer steps" in train["num_steps"]["description"]
    assert {"lora", "optimizer", "schedule", "checkpoint"} <= set(train)
    assert definitions["ParamsOverrides"]["properties"]["train"]["description"] == "Stage train."
    assert not definitions["TrainConfigOverrides"].get("required")  # every field optional

    served = deployment(root=str(REPO))
    served_schema = served._parameter_openapi_schema.model_dump()  # what serve() registers as the form
    assert served_schema["definitions"]["TrainConfigOverrides"]["properties"]["lr"] == train["lr"]
    assert served.parameters["root"] == str(REPO)

    form = ParamsOverrides.model_validate({"train.lr": 0.001, "train": {"num_steps": 5}})
    assert form.model_dump(mode="json", exclude_unset=True) == {"train": {"lr": 0.001, "num_steps": 5}}


def test_a_bad_override_stops_the_flow_before_any_task(tmp_path):
    from tuneline.core.params import ParamsError

    from tuneline.orchestration.flow import pipeline

    root = demo_project(tmp_path, ("ingest",))
    with pytest.raises(ParamsError, match=r"train\.num_stepz: unknown key\. Did you mean 'num_steps'\?"):
        pipeline(root=str(root), overrides={"train.num_stepz": 3})
    assert not (root / "data/ingested").exists() and not (root / ".tuneline/prefect/records").exists()


# --- slow: the flow end to end, cancellation and resume ---------------------------------------

@pytest.mark.slow
def test_flow_caches_cancels_resumes_and_reruns_only_what_changed(tmp_path):
    from mlflow import MlflowClient

    from tuneline.orchestration.flow import pipeline
    from tuneline.orchestration.runner import group_alive

    root = demo_project(tmp_path / "project")
    (root.parent / "logs").mkdir()
    log = root.parent / "logs/cancelled.log"

    # 1. A long training run, started as `python -m flows.pipeline`, terminated mid-training.
    with log.open("wb") as out:
        flow = subprocess.Popen(
            [sys.executable, "-m", "flows.pipeline", "--root", str(root),
             "-S", "train.num_steps=1000", "-S", "train.checkpoint.every_steps=1"],
            cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    pid_file = root / ".tuneline/prefect/running/train.pid"
    wait_for(lambda: pid_file.is_file() and list(root.glob("checkpoints/train/*/latest")), 400,
             "the first training checkpoint", flow, log)
    pgid = int(pid_file.read_text())
    spawned = descendants(flow.pid)
    flow.send_signal(signal.SIGTERM)
    assert flow.wait(timeout=300) == 143, log.read_text()[-3000:]
    assert not group_alive(pgid), "the stage's process group outlived the flow"
    assert not alive(spawned), f"left behind: {[p.cmdline() for p in alive(spawned)]}"
    output = log.read_text()
    assert "finishing this step, then saving a checkpoint" in output
    stopped_at = int(next(root.glob("checkpoints/train/*/latest")).read_text().strip().rsplit("_", 1)[-1])
    assert stopped_at >= 1

    # 2. Run again: the data stages are cache hits, training resumes from the checkpoint.
    resumed = pipeline(root=str(root), overrides={"train.num_steps": stopped_at + 1})
    cached = {stage: result["cached"] for stage, result in resumed["stages"].items()}
    # `models` runs every time (always_changed: it notices a model replaced in place).
    assert cached == {"models": False, "ingest": True, "bucket": True, "caption": True, "latents": True,
                      "train": False}
    assert (run_report(root, "train")["reused"], run_report(root, "train")["computed"]) == (stopped_at, 1)

    # 3. Unchanged: every task is a cache hit and no stage process starts.
    before = (root / "metrics/train.json").stat().st_mtime_ns
    again = pipeline(root=str(root), overrides={"train.num_steps": stopped_at + 1})
    assert all(result["cached"] for stage, result in again["stages"].items() if stage != "models")
    # A hit ran nothing: it reports no metrics as if it had.
    assert all(result["metrics"] is None and result["report"] is None
               for stage, result in again["stages"].items() if stage != "models")
    assert (root / "metrics/train.json").stat().st_mtime_ns == before

    # 4. One new photo: every stage downstream reruns, and inside each only that item.
    save_photo(root / "data/raw/shapes/new_photo.jpg", (700, 480), 42, quality=90)
    changed = pipeline(root=str(root), overrides={"train.num_steps": 1})
    assert not any(result["cached"] for result in changed["stages"].values())
    for stage in ("ingest", "bucket", "caption", "latents"):
        found = run_report(root, stage)
        assert (found["computed"], found["reused"] + found.get("given", 0)) == (1, 14), stage

    # MLflow: one parent per flow run, the stages its children; the terminated one is KILLED.
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tuneline").experiment_id
    runs = client.search_runs([experiment], max_results=200)
    parents = [r for r in runs if r.data.tags.get("tuneline.stage") == "pipeline"]
    assert len(parents) == 4
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED", "FINISHED", "KILLED"]
    assert all(r.data.tags.get("tuneline.raw_data_digest") for r in parents)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == changed["parent_run_id"]]
    # `models` runs on every repro and keeps no MLflow run (importing mlflow would cost it seconds).
    assert sorted(r.data.tags["tuneline.stage"] for r in children) == sorted(set(FLOW_STAGES) - {"models"})

    # 5. A rename: ingest and bucket run (computing nothing); their outputs are the same, so every
    #    later task is a cache hit.
    photo = root / "data/raw/shapes/new_photo.jpg"
    photo.rename(photo.with_name("renamed_photo.jpg"))
    renamed = pipeline(root=str(root), overrides={"train.num_steps": 1})
    cached = {stage: result["cached"] for stage, result in renamed["stages"].items()}
    assert cached == {"models": False, "ingest": False, "bucket": False, "caption": True, "latents": True,
                      "train": True}
    assert (run_report(root, "ingest")["computed"], run_report(root, "bucket")["computed"]) == (0, 0)

    # 6. A model replaced in place (same path, new weights): the latents recompute, all 15.
    from safetensors.torch import load_file, save_file

    from tuneline.tiny import resolve_tiny

    shutil.copytree(resolve_tiny("tiny-sdxl") / "vae", root / "my-vae")
    settings = {"train.num_steps": 1, "model.vae": "my-vae"}
    # A byte-identical copy of the base's VAE: the same identity, nothing to recompute.
    assert metrics_of(pipeline(root=str(root), overrides=settings), "latents")["computed"] == 0
    weights = root / "my-vae/diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)
    replaced = pipeline(root=str(root), overrides=settings)
    assert not replaced["stages"]["latents"]["cached"] and replaced["stages"]["caption"]["cached"] is False
    assert metrics_of(replaced, "latents")["computed"] == 15 and metrics_of(replaced, "caption")["computed"] == 0


def metrics_of(summary: dict, stage: str) -> dict:
    """The run report of a stage that ran in this flow run (computed, reused, ...)."""
    assert not summary["stages"][stage]["cached"], f"{stage} was a cache hit"
    return summary["stages"][stage]["report"]


# --- slow: tuneline ui, tuneline repro ---------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_mlflow_and_prefect_and_stops_both(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    mlflow_port, prefect_port = free_port(), free_port()
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        ui = subprocess.Popen([sys.executable, "-m", "tuneline.cli", "ui", "--mlflow-port", str(mlflow_port),
                               "--prefect-port", str(prefect_port), "--start-timeout", "400"],
                              cwd=tmp_path, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "Ctrl-C stops both" in log.read_text(), 420, "both UIs", ui, log)
        output = log.read_text()
        assert f"MLflow UI: http://127.0.0.1:{mlflow_port}" in output
        assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in output
        for url in (f"http://127.0.0.1:{mlflow_port}/health", f"http://127.0.0.1:{prefect_port}/api/health"):
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200, url
        spawned = descendants(ui.pid)
        groups = {os.getpgid(p.pid) for p in spawned}
        assert len(groups) == 2 and ui.pid not in groups  # one group each, neither ours
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if ui.poll() is None:
            ui.kill()
    assert "stopped MLflow and Prefect" in log.read_text()
    assert not alive(spawned), f"left behind: {[p.cmdline() for p in alive(spawned)]}"


@pytest.mark.slow
def test_repro_gives_dvc_stages_one_parent_run(tmp_path):
    from mlflow import MlflowClient

    root = demo_project(tmp_path, ("ingest",))
    done = subprocess.run([sys.executable, "-m", "tuneline.cli", "repro"], cwd=root, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Running stage 'ingest'" in done.stdout
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tuneline").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("tuneline.stage") == "pipeline"]
    (child,) = [r for r in runs if r.data.tags.get("tuneline.stage") == "ingest"]
    assert parent.info.status == "FINISHED" and parent.data.tags["tuneline.orchestrator"] == "dvc"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
