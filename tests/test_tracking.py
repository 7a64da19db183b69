"""MLflow tracker: runs, params, metrics, images, parent/child runs, statuses, no-op mode.

One SQLite store per module: creating an MLflow database costs a few seconds."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from PIL import Image

from tuneline.core.tracking.tracker import (
    GIT_COMMIT_TAG,
    PARENT_RUN_ENV,
    STAGE_TAG,
    NullTracker,
    Tracker,
    TrackingConfig,
    end_parent_run,
    flatten_params,
    git_commit,
    start_parent_run,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A project root that is a git repository with one commit."""
    root = tmp_path_factory.mktemp("project")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "init"], cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def config() -> TrackingConfig:
    # System metrics off except in their own test: the monitor thread is not what these test.
    return TrackingConfig(system_metrics=False)


@pytest.fixture(scope="module")
def client(root, config):
    from mlflow import MlflowClient

    return MlflowClient(config.resolved_tracking_uri(root))


@pytest.fixture(autouse=True)
def no_parent_env(monkeypatch):
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    # set_system_metrics_sampling_interval writes this variable; restore it after each test.
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)


def test_config_resolves_paths_against_root(tmp_path):
    config = TrackingConfig()
    assert config.resolved_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert config.resolved_artifact_root(tmp_path) == (tmp_path / "mlartifacts").resolve().as_uri()
    absolute = TrackingConfig(tracking_uri="sqlite:////srv/db/mlflow.db?timeout=30", artifact_root="s3://b/p")
    assert absolute.resolved_tracking_uri(tmp_path) == "sqlite:////srv/db/mlflow.db?timeout=30"
    assert absolute.resolved_artifact_root(tmp_path) == "s3://b/p"
    assert TrackingConfig(tracking_uri="http://host:5000").resolved_tracking_uri(tmp_path) == "http://host:5000"


def test_flatten_params_dotted_json_truncated():
    from pydantic import BaseModel

    class Lora(BaseModel):
        rank: int = 16
        targets: list[str] = ["to_q", "to_k"]

    class Train(BaseModel):
        lora: Lora = Lora()
        lr: float = 1e-4
        path: Path = Path("models/x")
        seed: int | None = None

    flat = flatten_params({"train": Train(), "long": "x" * 7000, "flag": True, "weird key!": 1})
    assert flat == {
        "train.lora.rank": "16",
        "train.lora.targets": '["to_q", "to_k"]',
        "train.lr": "0.0001",
        "train.path": "models/x",
        "train.seed": "null",
        "long": "x" * 6000,
        "flag": "true",
        "weird key_": "1",
    }


def test_run_logs_params_metrics_image_and_artifact(root, config, client, tmp_path, caplog):
    params = {f"group{g}": {f"key{k}": k for k in range(60)} for g in range(3)}  # 180 > one batch
    params["train"] = {"lora": {"rank": 8}, "prompt": "y" * 6500}
    exported = tmp_path / "lora.safetensors"
    exported.write_bytes(b"weights")
    with Tracker.start(config, root, run_name="train", stage="train", tags={"data.digest": "abc"}) as tracker:
        assert tracker.active
        tracker.log_params(params)
        tracker.log_metrics({"loss": 0.5, "lr": 1e-4}, step=1)
        tracker.log_metrics({"loss": 0.25, "lr": 1e-4}, step=2)
        with caplog.at_level("WARNING", logger="tuneline.core.tracking.tracker"):
            tracker.log_metrics({"loss": math.nan, "grad_norm": math.inf, "lr": 2e-4}, step=3)
            tracker.log_metrics({"loss": math.nan}, step=4)
        assert len([r for r in caplog.records if "non-finite" in r.getMessage()]) == 1
        tracker.log_image(Image.new("RGB", (8, 8), "red"), "eval/step_000002/prompt_0.png")
        tracker.log_artifact(exported, "export")
        tracker.set_tags({"note": "hello"})
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lora.rank"] == "8"
    assert run.data.params["train.prompt"] == "y" * 6000
    assert run.data.params["group2.key59"] == "59"
    assert len(run.data.params) == 182
    assert run.data.tags[STAGE_TAG] == "train"
    assert run.data.tags["data.digest"] == "abc"
    assert run.data.tags["note"] == "hello"
    assert run.data.tags["mlflow.runName"] == "train"
    assert "mlflow.parentRunId" not in run.data.tags
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss/train")] == [(1, 0.5), (2, 0.25)]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "lr")] == [1, 2, 3]
    assert client.get_metric_history(tracker.run_id, "grad_norm") == []
    assert [a.path for a in client.list_artifacts(tracker.run_id, "eval/step_000002")] == [
        "eval/step_000002/prompt_0.png"
    ]
    image_path = client.download_artifacts(tracker.run_id, "eval/step_000002/prompt_0.png", str(tmp_path))
    assert Image.open(image_path).getpixel((0, 0)) == (255, 0, 0)
    assert [a.path for a in client.list_artifacts(tracker.run_id, "export")] == ["export/lora.safetensors"]
    # The artifact root is the configured folder under the project root.
    assert run.info.artifact_uri.startswith((root / "mlartifacts").resolve().as_uri())
    assert (root / "mlflow.db").is_file()
    assert not tracker.active


def test_git_commit_tag(root, config, client, tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert git_commit(root) == head
    assert git_commit(tmp_path) == "unknown"
    assert git_commit(tmp_path / "missing") == "unknown"
    with Tracker.start(config, root, run_name="ingest", stage="ingest") as tracker:
        tracker.begin()
    assert client.get_run(tracker.run_id).data.tags[GIT_COMMIT_TAG] == head


def test_child_runs_under_parent(root, config, client, monkeypatch):
    parent = start_parent_run(config, root, "pipeline", tags={"trigger": "test"})
    with Tracker.start(config, root, run_name="bucket", stage="bucket", parent_run_id=parent) as explicit:
        explicit.log_metrics({"computed": 1})
    monkeypatch.setenv(PARENT_RUN_ENV, parent)
    with Tracker.start(config, root, run_name="caption", stage="caption") as from_env:
        from_env.log_metrics({"computed": 1})
    assert end_parent_run(config, root, parent, "FINISHED")

    for run_id, stage in ((explicit.run_id, "bucket"), (from_env.run_id, "caption")):
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.parentRunId"] == parent
        assert tags[STAGE_TAG] == stage
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags[STAGE_TAG] == "pipeline"
    assert parent_run.data.tags["trigger"] == "test"
    assert parent_run.info.run_name == "pipeline"


def test_nothing_recorded_means_no_run_and_no_empty_parent(root, config, client, monkeypatch):
    parent = start_parent_run(config, root, "pipeline")
    monkeypatch.setenv(PARENT_RUN_ENV, parent)
    with Tracker.start(config, root, run_name="ingest", stage="ingest") as idle:
        idle.log_params({"ingest": {"min_size": 64}})  # kept for a run that never comes
        idle.set_tags({"note": "x"})
    assert idle.run_id is None and not idle.started
    assert end_parent_run(config, root, parent, "FINISHED") is False  # every stage was a no-op
    experiment = client.get_experiment_by_name(config.experiment)
    assert client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'") == []
    assert client.get_run(parent).info.lifecycle_stage == "deleted"
    # MLflow 3's UI shows the experiment as model training, not GenAI evaluation.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_continued_run_is_one_run_with_one_curve(root, config, client, monkeypatch):
    first_parent = start_parent_run(config, root, "pipeline 1")
    with Tracker.start(config, root, run_name="train", stage="train", parent_run_id=first_parent) as first:
        first.log_params({"train": {"lr": 0.1, "num_steps": 2}})
        first.log_metrics({"loss": 1.0}, step=1)
        first.log_metrics({"loss": 0.9}, step=2)
        killed_id = first.run_id
    client.update_run(killed_id, status="RUNNING")  # as a SIGKILLed session leaves it: never ended
    assert end_parent_run(config, root, first_parent, "KILLED")
    assert client.get_run(killed_id).info.status == "RUNNING"

    second_parent = start_parent_run(config, root, "pipeline 2")
    with Tracker.start(config, root, run_name="train", stage="train", parent_run_id=second_parent) as second:
        second.continue_run(killed_id)
        second.log_params({"train": {"lr": 0.1, "num_steps": 4}})  # num_steps raised for the resume
        second.log_metrics({"loss": 0.8}, step=3)
    assert second.run_id == killed_id
    run = client.get_run(killed_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_steps"] == "2" and run.data.tags["changed_param.train.num_steps"] == "2 -> 4"
    assert [(m.step, m.value) for m in client.get_metric_history(killed_id, "loss/train")] == [(1, 1.0), (2, 0.9), (3, 0.8)]
    assert run.data.tags["mlflow.parentRunId"] == first_parent  # still the child of the run that started it
    # ... and the pipeline run that continued it names it, so it is not an empty parent.
    assert end_parent_run(config, root, second_parent, "FINISHED")
    assert client.get_run(second_parent).data.tags["tuneline.continued_run.train"] == killed_id

    # A run id that no longer exists: a new run, not a failure.
    client.delete_run(killed_id)
    with Tracker.start(config, root, run_name="train", stage="train") as third:
        third.continue_run(killed_id)
        third.log_metrics({"loss": 0.5}, step=1)
    assert third.run_id != killed_id and client.get_run(third.run_id).info.status == "FINISHED"


def test_stale_parent_env_gives_top_level_run(root, config, client, monkeypatch):
    monkeypatch.setenv(PARENT_RUN_ENV, "0" * 32)
    with Tracker.start(config, root, run_name="latents", stage="latents") as tracker:
        tracker.begin()
    assert "mlflow.parentRunId" not in client.get_run(tracker.run_id).data.tags


@pytest.mark.parametrize(
    ("error", "status"),
    [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"), (SystemExit(2), "FAILED")],
)
def test_status_on_exception(root, config, client, error, status):
    with pytest.raises(type(error)):
        with Tracker.start(config, root, run_name="train", stage="train") as tracker:
            raise error
    assert client.get_run(tracker.run_id).info.status == status


def test_system_metrics_sampled(root, client):
    config = TrackingConfig(system_metrics=True, system_metrics_interval_s=0.2)
    with Tracker.start(config, root, run_name="train", stage="train") as tracker:
        tracker.begin()
        time.sleep(0.7)
    metrics = client.get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


@pytest.mark.parametrize("kwargs", [{"enabled": False}, {"is_main_process": False}])
def test_disabled_or_non_main_touches_nothing(tmp_path, kwargs):
    config = TrackingConfig(enabled=kwargs.get("enabled", True))
    with Tracker.start(
        config, tmp_path, run_name="train", stage="train", is_main_process=kwargs.get("is_main_process", True)
    ) as tracker:
        assert isinstance(tracker, NullTracker)
        assert not tracker.active and tracker.run_id is None
        tracker.log_params({"a": {"b": 1}})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_image(Image.new("RGB", (4, 4)), "eval/x.png")
        tracker.log_artifact(tmp_path / "missing.bin")
        tracker.set_tags({"x": "y"})
    if not config.enabled:
        assert start_parent_run(config, tmp_path, "pipeline") is None
        end_parent_run(config, tmp_path, None)
    assert list(tmp_path.iterdir()) == []


def test_system_metrics_log_every_gpu_separately(root, client, monkeypatch):
    """Pins what MLflow's built-in monitor does with several GPUs: one gpu_<i>_* series each.
    NVML is faked (no GPU here); on a GPU machine nvidia-ml-py provides the real `pynvml`."""
    from mlflow.system_metrics.metrics import gpu_monitor

    class NVMLError(Exception):
        pass

    fake = types.ModuleType("pynvml")
    fake.NVMLError = NVMLError
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda index: index
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(h + 1) * 1e9, total=80e9)
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=10 * (h + 1))
    fake.nvmlDeviceGetPowerUsage = lambda h: 100_000 * (h + 1)
    fake.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(gpu_monitor, "pynvml", fake, raising=False)

    config = TrackingConfig(system_metrics=True, system_metrics_interval_s=0.2)
    with Tracker.start(config, root, run_name="train", stage="train") as tracker:
        tracker.begin()
        time.sleep(0.5)
    metrics = client.get_run(tracker.run_id).data.metrics
    assert metrics["system/gpu_0_utilization_percentage"] == 10
    assert metrics["system/gpu_1_utilization_percentage"] == 20
    assert metrics["system/gpu_1_memory_usage_megabytes"] == 2000
    assert metrics["system/gpu_1_power_usage_watts"] == 200


class _Entry:
    """A registry entry standing in for a stage: `work` is what its run function does."""

    tracked, trains = True, True

    def __init__(self, work):
        self.run = work


@pytest.mark.parametrize("computed", [3, 0])
def test_stage_runs_chart_curves_only_and_cover_the_work(root, config, client, monkeypatch, computed):
    """Issue 30: a stage's report numbers are run tags (not one-value charts ahead of the loss), and a
    run that opens late starts when the stage started; a stage with nothing to do still opens no run."""
    from tuneline import cli
    from tuneline.core.report import StageReport

    def work(params, root_, tracker, **options):
        time.sleep(0.3)  # checking inputs, computing items: before the first record
        if computed:
            tracker.log_metrics({"loss": 0.5, "val/loss": 0.6}, step=1)
            tracker.log_metrics({"loss": 0.4}, step=2)
        return StageReport("train", computed=computed, reused=2, seconds=0.3)

    monkeypatch.setattr(cli.registry, "stage", lambda name: _Entry(work))
    params = types.SimpleNamespace(tracking=config)

    def runs():  # the experiment exists once any test of this module made a run
        experiment = client.get_experiment_by_name(config.experiment)
        return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []

    before = {r.info.run_id for r in runs()}
    started_ms = time.time() * 1000
    cli._run_tracked("train", params, root, {})
    new = [r for r in runs() if r.info.run_id not in before]
    if not computed:
        assert new == []
        return
    (run,) = new
    # No report/* one-value charts; the loss in MLflow's first chart section, training before validation.
    assert sorted(run.data.metrics) == ["loss/train", "loss/validation"]
    assert run.data.tags["tuneline.report.computed"] == "3" and run.data.tags["tuneline.report.reused"] == "2"
    assert run.data.tags["tuneline.report.seconds"] == "0.3"
    assert run.info.start_time <= started_ms + 50 and run.info.end_time - run.info.start_time >= 300


def test_run_link_opens_the_run_in_the_model_training_view(root, config, client):
    from tuneline.core.tracking.tracker import run_link

    with Tracker.start(config, root, run_name="render", stage="render") as tracker:
        assert tracker.link() is None  # nothing recorded yet: no run
        tracker.log_facts({"computed": 1})
    experiment = client.get_run(tracker.run_id).info.experiment_id
    expected = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{tracker.run_id}?workflowType=machine_learning"
    assert tracker.link() == expected == run_link(config, root, tracker.run_id)
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
