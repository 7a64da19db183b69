"""The Prefect flow, its cache keys, cancellation, the parameter form, `tuneline ui` and `tuneline repro`.

Prefect runs ephemeral (no PREFECT_API_URL) with one PREFECT_HOME for the whole session:
its first run on a fresh home sets up a database (~15 s), later ones take a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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

from conftest import PROJECT_TREES, save_photo

REPO = Path(__file__).resolve().parents[1]
FLOW_STAGES = ("models", "scan", "ingest", "bucket", "autoencoder", "caption", "latents", "train")


@pytest.fixture(scope="session", autouse=True)
def prefect_env(tmp_path_factory):
    """Ephemeral Prefect, quiet, one home per test session (set before prefect is imported)."""
    base = tmp_path_factory.getbasetemp()
    os.environ["PREFECT_HOME"] = str(base / "prefect-home")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # first start on a fresh home: ~25 s
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
    for name in PROJECT_TREES:
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
    assert specs["bucket"].params == ("datasets", "bucket", "ingest.max_pixels", "pack_digits")
    assert "data/ingested" in specs["bucket"].data_deps and "src/tuneline/stages/bucket" in specs["bucket"].code_deps
    assert specs["train"].outs == ("models/train",) and specs["train"].persistent_outs == ("checkpoints/train",)


def test_cache_keys_follow_content_params_and_code(tmp_path):
    from tuneline.config import load_params
    from tuneline.orchestration.cachekey import output_fingerprint, stage_key, write_record
    from tuneline.orchestration.spec import load_stage_specs
    from tuneline.orchestration.cachekey import outputs_match
    from tuneline.orchestration import registry
    from tuneline.orchestration.overrides import apply_overrides

    root = demo_project(tmp_path, ("scan", "ingest", "bucket"))
    specs = {spec.name: spec for spec in load_stage_specs(root)}
    data = yaml.safe_load((root / "params.yaml").read_text())
    params = load_params(root / "params.yaml")

    def key(stage: str, p=params) -> str:
        return stage_key(specs[stage], p, root).key

    def scan() -> None:  # the raw files reach the keys through what the scan stage lists
        registry.stage("scan").run(params, root)

    scan()
    ingest, bucket = key("ingest"), key("bucket")
    photo = next((root / "data/raw/shapes").glob("*.jpg"))
    os.utime(photo, (1_000_000, 1_000_000))  # touched: same bytes, same key
    scan()
    assert key("ingest") == ingest
    photo.write_bytes(photo.read_bytes() + b"\0")  # one byte more: new key, once scanned
    assert key("ingest") == ingest
    scan()
    # bucket's key follows data/ingested, which holds every raw file's digest: it changes when ingest has run.
    assert key("ingest") != ingest and key("bucket") == bucket
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


def test_the_scan_hashes_each_raw_file_once_and_no_stage_key_reads_one(tmp_path, monkeypatch):
    """The raw data is hashed by the scan stage alone, each file once (later scans: by the stat cache);
    the ingest and bucket keys then derive from its list, so neither reads a raw file again."""
    from collections import Counter

    from tuneline.config import load_params
    from tuneline.core.store import FileDigests
    from tuneline.orchestration import registry
    from tuneline.orchestration.cachekey import Digester, stage_key
    from tuneline.orchestration.spec import load_stage_specs
    from tuneline.stages.scan import stage as scan_stage

    root = demo_project(tmp_path, ("scan", "ingest", "bucket"))
    specs = {spec.name: spec for spec in load_stage_specs(root)}
    params = load_params(root / "params.yaml")
    hashed: Counter[str] = Counter()
    original = scan_stage.file_digest
    monkeypatch.setattr(scan_stage, "file_digest", lambda path: hashed.update([str(path)]) or original(path))
    raw_files = {str(p.resolve()) for p in (root / "data/raw").rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert len(raw_files) > 20
    first = registry.stage("scan").run(params, root)
    assert set(hashed) == raw_files and set(hashed.values()) == {1} and first.computed == len(raw_files)
    again = registry.stage("scan").run(params, root)
    assert sum(hashed.values()) == len(raw_files) and (again.computed, again.reused) == (0, len(raw_files))

    digested: list[Path] = []
    keyed = FileDigests.digest
    monkeypatch.setattr(FileDigests, "digest", lambda self, path: digested.append(path) or keyed(self, path))
    with Digester(root, params.store_dir) as digester:
        for name in ("ingest", "bucket"):
            stage_key(specs[name], params, root, digester)
    assert digested and not [path for path in digested if (root / "data/raw") in path.parents]


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
    # What the form posts (null sections, nulls for untouched fields) with out-of-range values: each named
    # by its dotted key with what it allows.
    with pytest.raises(ParamsError) as posted:
        apply_overrides(data, {"train": {"lr": -1, "mixed_precision": "fp8", "lora": None}, "render": None})
    assert problems(posted) == ["  - train.lr: Input should be greater than 0 (got -1)",
                                "  - train.mixed_precision: Input should be 'no', 'fp16' or 'bf16' (got 'fp8')"]


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
    served_lr = served_schema["definitions"]["TrainConfigOverrides"]["properties"]["lr"]
    # The same field, its description ending with params.yaml's value (what an empty field keeps).
    assert {**served_lr, "description": train["lr"]["description"]} == train["lr"]
    current = yaml.safe_load((REPO / "params.yaml").read_text())["train"]["lr"]
    assert served_lr["description"] == f"{train['lr']['description']} (params.yaml: {json.dumps(current)})"
    sections = list(served_schema["definitions"]["ParamsOverrides"]["properties"])
    assert [name for name in sections if name in ("model", "ingest", "bucket", "autoencoder", "caption", "latents",
                                                   "train", "render", "export")] == [
        "model", "ingest", "bucket", "autoencoder", "caption", "latents", "train", "render", "export"]  # pipeline order
    assert served.parameters["root"] == str(REPO)

    form = ParamsOverrides.model_validate({"train.lr": 0.001, "train": {"num_steps": 5}})
    assert form.model_dump(mode="json", exclude_unset=True) == {"train": {"lr": 0.001, "num_steps": 5}}


def _ui_form_post(schema: dict, node: dict, edits: dict) -> dict:
    """What the Prefect UI's custom-run form posts for an object field: every property present,
    nested objects expanded, untouched fields null; `edits` (nested) are the fields a person set."""
    definitions = schema["definitions"]
    posted = {}
    for name, prop in node["properties"].items():
        refs = [option["$ref"] for option in prop.get("anyOf", [prop]) if "$ref" in option]
        if name in edits and not isinstance(edits[name], dict):
            posted[name] = edits[name]
        elif refs:
            posted[name] = _ui_form_post(schema, definitions[refs[0].rsplit("/", 1)[-1]], edits.get(name, {}))
        else:
            posted[name] = None
    return posted


def test_the_ui_forms_nulls_keep_params_yaml_and_set_to_null_sets_null():
    from tuneline.core.params import ParamsError
    from tuneline.orchestration.overrides import apply_overrides
    from tuneline.orchestration.serve import deployment

    schema = deployment(root=str(REPO))._parameter_openapi_schema.model_dump()
    form = schema["definitions"]["ParamsOverrides"]
    posted = _ui_form_post(schema, form, {"train": {"lr": 0.0003}})
    assert posted["train"]["lr"] == 0.0003 and posted["train"]["num_steps"] is None
    assert posted["train"]["lora"]["rank"] is None and posted["bucket"]["resolution"] is None
    assert posted["datasets"] is None and posted["set_to_null"] is None
    nulls = sum(1 for _ in _leaves(posted) if _ is None)
    assert nulls > 100  # the form really sends every field

    # Through JSON, as the server stores and hands the parameters to the flow run.
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    merged, params = apply_overrides(data, json.loads(json.dumps(posted)))
    assert params.train.lr == 0.0003
    expected = {**data, "train": {**data["train"], "lr": 0.0003}}
    assert merged == expected  # nothing else moved

    # The explicit way to null a field, and `-S key=null` on the command line maps to it.
    with_vae = {**data, "model": {**data["model"], "vae": "some/vae"}}
    _, nulled = apply_overrides(with_vae, {**posted, "set_to_null": ["model.vae"]})
    assert nulled.model.vae is None and nulled.train.lr == 0.0003
    with pytest.raises(ParamsError, match="set_to_null: expected a list of dotted keys"):
        apply_overrides(data, {"set_to_null": "model.vae"})


def _leaves(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    else:
        yield node


def test_serve_and_repro_pass_every_argument_on(monkeypatch):
    from tuneline import cli

    seen = []
    monkeypatch.setattr(cli, "_run_orchestration_command", lambda args: seen.append(args) or 0)
    cli.main(["--root", "/p", "repro", "--dry", "-s", "train"])
    cli.main(["serve", "--name", "x", "--params", "other.yaml"])
    cli.main(["--params", "p.yaml", "repro"])
    assert seen[0].dvc_args == ["--dry", "-s", "train"] and str(seen[0].root) == "/p"
    assert seen[1].serve_args == ["--name", "x", "--params", "other.yaml"]
    assert seen[2].dvc_args == [] and str(seen[2].params) == "p.yaml"


def test_the_flows_command_line_reads_set_like_dvc_exp_run(monkeypatch, capsys):
    """`python -m flows.pipeline -S`: values read as YAML, `null` to set_to_null, after --overrides."""
    from tuneline.orchestration import flow

    seen = {}
    monkeypatch.setattr(flow, "pipeline", lambda **kwargs: seen.update(kwargs) or {})
    assert flow.main(["--overrides", '{"train.seed": 3, "set_to_null": ["model.config"]}', "-S", "train.seed=4",
                      "-S", "model.vae=null", "-S", "bucket.batch_sizes.1024x1024=1", "-S", "train.flip=true"]) == 0
    assert seen["overrides"] == {"train.seed": 4, "set_to_null": ["model.config", "model.vae"],
                                 "bucket.batch_sizes.1024x1024": 1, "train.flip": True}
    with pytest.raises(SystemExit) as stopped:
        flow.main(["-S", "train.seed"])
    assert stopped.value.code == 2 and "-S 'train.seed': expected KEY=VALUE" in capsys.readouterr().err


def test_a_bad_override_stops_the_flow_before_any_task(tmp_path):
    from tuneline.core.params import ParamsError

    from tuneline.orchestration.flow import pipeline

    root = demo_project(tmp_path, ("scan", "ingest"))
    with pytest.raises(ParamsError, match=r"train\.num_stepz: unknown key\. Did you mean 'num_steps'\?"):
        pipeline(root=str(root), overrides={"train.num_stepz": 3})
    assert not (root / "data/ingested").exists() and not (root / ".tuneline/prefect/records").exists()


def test_serve_watchdog_waits_out_a_server_that_answers_and_gives_up_once_nothing_listens():
    import asyncio
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    from tuneline.orchestration.serve import _until_server_lost

    class WantsAKey(BaseHTTPRequestHandler):  # a server behind auth still answers: it is up
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), WantsAKey)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"

    async def scenario():
        watching = asyncio.create_task(_until_server_lost(url, poll_s=0.05, refused_for_s=0.3, silent_for_s=60))
        await asyncio.sleep(1.0)
        assert not watching.done()
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        stopped = time.monotonic()
        return await asyncio.wait_for(watching, 10), time.monotonic() - stopped

    answered, took = asyncio.run(scenario())
    assert answered and took < 3


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
    # An orderly stop, not a crash: the train task and the flow run end Cancelled, the log names
    # the checkpoint and the command that resumes this run, overrides included.
    assert "Crash detected" not in output and "Traceback" not in output
    # Library chatter stays in the stages' log files: no loading bars, no MLflow INFO lines.
    assert "Loading weights" not in output and "mlflow.store" not in output and "system_metrics" not in output
    checkpoint = next(root.glob("checkpoints/train/*/step_*"))
    assert f"checkpoint {checkpoint.parent}" in output
    assert (f"To resume, run: python -m flows.pipeline --root {root} -S train.num_steps=1000 "
            "-S train.checkpoint.every_steps=1") in output
    flow_state, task_states = last_flow_run_states()
    assert flow_state == "Cancelled" and task_states["train"] == "Cancelled", (flow_state, task_states)

    # 2. Run again: the data stages are cache hits, training resumes from the checkpoint.
    resumed = pipeline(root=str(root), overrides={"train.num_steps": stopped_at + 1})
    cached = {stage: result["cached"] for stage, result in resumed["stages"].items()}
    # `models` and `scan` run every time (always_changed: they notice a model replaced in place, a raw file added).
    assert cached == {"models": False, "scan": False, "ingest": True, "bucket": True, "autoencoder": True,
                      "caption": True, "latents": True, "train": False}
    assert (run_report(root, "train")["reused"], run_report(root, "train")["computed"]) == (stopped_at, 1)

    # 3. Unchanged: every task is a cache hit and no stage process starts; no (empty) MLflow run.
    before = (root / "metrics/train.json").stat().st_mtime_ns
    again = pipeline(root=str(root), overrides={"train.num_steps": stopped_at + 1})
    assert all(result["cached"] for stage, result in again["stages"].items() if stage not in ("models", "scan"))
    assert again["parent_run_id"] is None
    # A hit ran nothing: it reports no metrics as if it had.
    assert all(result["metrics"] is None and result["report"] is None
               for stage, result in again["stages"].items() if stage not in ("models", "scan"))
    assert (root / "metrics/train.json").stat().st_mtime_ns == before

    # 4. One new photo: every stage downstream reruns, and inside each only that item.
    save_photo(root / "data/raw/shapes/new_photo.jpg", (700, 480), 42, quality=90)
    changed = pipeline(root=str(root), overrides={"train.num_steps": 1})
    assert not any(result["cached"] for result in changed["stages"].values())
    for stage in ("ingest", "bucket", "caption", "latents"):
        found = run_report(root, stage)
        assert (found["computed"], found["reused"] + found.get("given", 0)) == (1, 14), stage

    # MLflow: one parent per flow run that ran something (not the all-cached one), the stages its
    # children; the terminated one is KILLED. Its training run was continued by the resume: one
    # MLflow run, one curve.
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tuneline").experiment_id
    runs = client.search_runs([experiment], max_results=200)
    parents = [r for r in runs if r.data.tags.get("tuneline.stage") == "pipeline"]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED", "KILLED"]
    resumed_parent = client.get_run(resumed["parent_run_id"])
    train_run = client.get_run(resumed_parent.data.tags["tuneline.continued_run.train"])
    assert train_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "loss/train")][-1] == stopped_at + 1
    assert all(r.data.tags.get("tuneline.raw_data_digest") for r in parents)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == changed["parent_run_id"]]
    # `models` and `scan` run on every repro and keep no MLflow run (importing mlflow would cost them seconds);
    # neither does the disabled autoencoder stage, which records nothing.
    assert sorted(r.data.tags["tuneline.stage"] for r in children) == sorted(set(FLOW_STAGES) - {"models", "scan", "autoencoder"})

    # 5. A rename: ingest and bucket run (computing nothing); their outputs are the same, so every
    #    later task is a cache hit.
    photo = root / "data/raw/shapes/new_photo.jpg"
    photo.rename(photo.with_name("renamed_photo.jpg"))
    renamed = pipeline(root=str(root), overrides={"train.num_steps": 1})
    cached = {stage: result["cached"] for stage, result in renamed["stages"].items()}
    assert cached == {"models": False, "scan": False, "ingest": False, "bucket": False, "autoencoder": True,
                      "caption": True, "latents": True, "train": True}
    assert (run_report(root, "ingest")["computed"], run_report(root, "bucket")["computed"]) == (0, 0)
    # (A model replaced in place: test_staleness, under DVC. The flow runs the same `models` stage
    # always, and its keys follow models/identity's content like any dependency's.)


def last_flow_run_states() -> tuple[str, dict[str, str]]:
    """The newest flow run's state and its task runs' states, from Prefect's database."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    with get_client(sync_client=True) as client:  # sort and limit given: see README on HTTP 422
        (run,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                                      sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=50)
    return run.state.name, {task.name: task.state.name for task in tasks}


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
def test_ui_serves_both_on_its_ports_and_serve_stops_with_it(tmp_path):
    """One `tuneline ui` on free ports: both UIs answer, the Prefect UI calls the API on the chosen
    port, the Prefect CLI lists what `tuneline serve` registered (no 422), and stopping the UI
    stops both servers and makes serve exit promptly with one line."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    mlflow_port, prefect_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    log, serve_log = tmp_path / "ui.log", tmp_path / "serve.log"
    with log.open("wb") as out:
        ui = subprocess.Popen([sys.executable, "-m", "tuneline.cli", "ui", "--mlflow-port", str(mlflow_port),
                               "--prefect-port", str(prefect_port), "--start-timeout", "400"],
                              cwd=tmp_path, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    serve = None
    try:
        wait_for(lambda: "Ctrl-C stops both" in log.read_text(), 420, "both UIs", ui, log)
        output = log.read_text()
        # MLflow 3 opens in its GenAI view unless the address asks for model training
        assert f"MLflow UI: http://127.0.0.1:{mlflow_port}/#/experiments?workflowType=machine_learning" in output
        assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in output
        assert f"export PREFECT_API_URL={api_url}\n" in output
        for url in (f"http://127.0.0.1:{mlflow_port}/health", f"{api_url}/health"):
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200, url
        with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/ui-settings", timeout=10) as response:
            assert json.load(response)["api_url"] == api_url  # what the browser calls
        spawned = descendants(ui.pid)
        groups = {os.getpgid(p.pid) for p in spawned}
        assert len(groups) == 2 and ui.pid not in groups  # one group each, neither ours

        client_env = {**child_env(), "PREFECT_API_URL": api_url, "COLUMNS": "200"}
        with serve_log.open("wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "tuneline.cli", "serve"], cwd=tmp_path, env=client_env,
                                     stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: "tuneline-pipeline/tuneline" in serve_log.read_text(), 120, "serve", serve, serve_log)
        # POST /deployments/filter, /flows/filter, /flow_runs/filter: HTTP 422 with fastapi >= 0.151.
        listing = {command: subprocess.Popen([sys.executable, "-m", "prefect", command, "ls"], env=client_env,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for command in ("deployment", "flow-run")}
        listed = {command: process.communicate(timeout=120)[0] for command, process in listing.items()}
        for command, process in listing.items():
            # The status as a word: a flow run's UUID may hold the digits 422 ("101eb271-1422-...").
            assert process.returncode == 0 and not re.search(r"\b422\b", listed[command]), listed[command]
        assert "tuneline-pipeline/tuneline" in listed["deployment"], listed["deployment"]

        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert serve.wait(timeout=15) == 1, serve_log.read_text()[-3000:]  # the server is gone: serve follows
    finally:
        for process in (serve, ui):
            if process is not None and process.poll() is None:
                process.kill()
    assert "stopped MLflow and Prefect" in log.read_text()
    assert not alive(spawned), f"left behind: {[p.cmdline() for p in alive(spawned)]}"
    said = serve_log.read_text()
    assert said.count(f"the Prefect server at {api_url} stopped answering; stopping serve\n") == 1, said[-3000:]
    assert "Traceback" not in said, said[-3000:]


@pytest.mark.slow
def test_repro_gives_dvc_stages_one_parent_run(tmp_path):
    from mlflow import MlflowClient

    root = demo_project(tmp_path, ("scan", "ingest"))
    # Options go through to dvc as README promises: --dry shows the stage and runs nothing.
    # (The first stage only: on a fresh project DVC's dry run stops at the second, whose input is missing.)
    dry = subprocess.run([sys.executable, "-m", "tuneline.cli", "repro", "--dry", "scan"], cwd=root, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "python -m stages.scan" in dry.stdout, dry.stdout + dry.stderr
    assert not (root / "data/scanned").exists()
    done = subprocess.run([sys.executable, "-m", "tuneline.cli", "repro"], cwd=root, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Running stage 'ingest'" in done.stdout
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tuneline").experiment_id])
    # The dry run ran nothing and left no parent run; the real one has the stage as its child.
    (parent,) = [r for r in runs if r.data.tags.get("tuneline.stage") == "pipeline"]
    (child,) = [r for r in runs if r.data.tags.get("tuneline.stage") == "ingest"]
    assert parent.info.status == "FINISHED" and parent.data.tags["tuneline.orchestrator"] == "dvc"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # What the data sets held, as the scan stage listed it (no walk of the raw folders of its own).
    scanned = (root / "data/scanned/manifest.jsonl").read_bytes()
    assert parent.data.tags["tuneline.raw_data_digest"] == hashlib.sha256(scanned).hexdigest()
