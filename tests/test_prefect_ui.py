"""What the Prefect UI shows for the pipeline: the form's limits, checked by Prefect's own JSON-schema
validation (the code behind the UI's "validate parameters" and the server's run creation); a bad
value that still reaches the flow; an orderly cancel; a stage's warnings at WARNING.

The flow runs here go through `run_flow(..., error_logger=flow_run_logger(run))`, as the process that
Prefect's runner starts for a deployment's run (prefect.engine) calls it."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from test_flows import REPO, _ui_form_post, prefect_env  # noqa: F401  (one Prefect home: its database is set up once)

# JSON-schema keywords that limit a value (pydantic writes ge/gt/le/lt, multiple_of, lengths, patterns
# and Literal types as these).
LIMITS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
          "pattern", "enum", "const", "minItems", "maxItems"}


def _branches(prop: dict) -> list[dict]:
    """The non-null alternatives of a property (an Optional is anyOf [..., null])."""
    return [option for option in prop.get("anyOf", [prop]) if option.get("type") != "null"]


def _walk(params_defs: dict, params_node: dict, form_defs: dict, form_node: dict, path: str, found: dict) -> None:
    """Pair Params' properties with the form's, recursing through section references; record each
    constrained leaf's limits on both sides under its dotted key."""
    for name, prop in params_node["properties"].items():
        key = f"{path}{name}"
        assert name in form_node["properties"], f"{key} is missing from the form"
        mine, theirs = _branches(prop), _branches(form_node["properties"][name])
        assert len(mine) == len(theirs), key
        for index, (option, form_option) in enumerate(zip(mine, theirs)):
            if "$ref" in option:
                _walk(params_defs, params_defs[option["$ref"].rsplit("/", 1)[-1]],
                      form_defs, form_defs[form_option["$ref"].rsplit("/", 1)[-1]], f"{key}.", found)
                continue
            if option.get("type") == "array" and "$ref" in option.get("items", {}):
                _walk(params_defs, params_defs[option["items"]["$ref"].rsplit("/", 1)[-1]],
                      form_defs, form_defs[form_option["items"]["$ref"].rsplit("/", 1)[-1]], f"{key}[].", found)
            limits = {k: v for k, v in option.items() if k in LIMITS}
            if limits:
                found[f"{key}#{index}"] = (limits, {k: v for k, v in form_option.items() if k in LIMITS})


def form_schema() -> dict:
    """The form the served deployment registers (its parameter_openapi_schema: Prefect's
    parameter_schema of the flow function)."""
    from tuneline.orchestration.serve import deployment

    return deployment(root=str(REPO))._parameter_openapi_schema.model_dump()


def test_the_form_carries_every_limit_of_the_params_models():
    from tuneline.config import Params

    params = Params.model_json_schema()
    schema = form_schema()
    found: dict[str, tuple[dict, dict]] = {}
    _walk(params["$defs"], params, schema["definitions"], schema["definitions"]["ParamsOverrides"], "", found)
    differ = {key: pair for key, pair in found.items() if pair[0] != pair[1]}
    assert not differ, differ
    assert len(found) > 100  # bounds, multiples, lengths and enums all over params.yaml
    assert found["train.lr#0"][1] == {"exclusiveMinimum": 0}
    assert found["train.num_steps#0"][1] == {"minimum": 1}
    assert found["render.height#0"][1] == {"minimum": 8, "multipleOf": 8}
    assert found["train.mixed_precision#0"][1] == {"enum": ["no", "fp16", "bf16"]}
    assert found["datasets[].repeats#0"][1] == {"minimum": 1}  # the data sets' list keeps its own schema


def test_prefects_validation_rejects_out_of_range_values_and_names_the_field():
    from prefect.utilities.schema_tools.validation import (
        ValidationError, build_error_obj, is_valid_schema, preprocess_schema, validate,
    )

    schema = form_schema()
    form = schema["definitions"]["ParamsOverrides"]

    def posted(edits: dict) -> dict:  # the whole form, as the UI posts it, through JSON
        return {"params_path": "params.yaml", "root": str(REPO), "shards": 1,
                "overrides": _ui_form_post(schema, form, edits)}

    # POST /ui/schemas/validate (prefect.server.api.ui.schemas), what the form's "validate" calls.
    prepared = preprocess_schema(schema)
    is_valid_schema(prepared, preprocess=False)

    def ui_check(values: dict) -> dict:
        return build_error_obj(validate(values, prepared, preprocess=False))

    for edits, field, reason in (
            ({"train": {"lr": -1}}, "overrides.train.lr", "-1 is less than or equal to the minimum of 0"),
            ({"train": {"num_steps": 0}}, "overrides.train.num_steps", "0 is less than the minimum of 1")):
        # What the server runs on creating a deployment's flow run (enforce_parameter_schema).
        with pytest.raises(ValidationError) as refused:
            validate(posted(edits), schema, raise_on_error=True)
        assert str(refused.value) == f"Validation failed for field {field!r}. Failure reason: {reason}"
        assert ui_check(posted(edits))["valid"] is False
    assert ui_check(posted({"render": {"height": 500}}))["valid"] is False  # multipleOf 8
    good = posted({"train": {"lr": 0.0003}})
    validate(good, schema, raise_on_error=True)
    assert ui_check(good) == {"errors": [], "valid": True}
    assert good["overrides"]["train"]["num_steps"] is None  # the untouched fields the form posts pass too


@pytest.fixture
def prefect_records():
    """Every record Prefect's loggers handle (flow and task run loggers propagate to `prefect`)."""
    import prefect.main  # noqa: F401  (sets Prefect's logging up, which replaces its loggers' handlers)

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    logging.getLogger("prefect").addHandler(handler)
    yield records
    logging.getLogger("prefect").removeHandler(handler)


def run_as_the_runner_does(flow: Any, parameters: dict) -> tuple[Any, Exception | None]:
    """Create a flow run and run it as the runner's flow-run process does; return the run as
    stored and what run_flow raised."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.logging.loggers import flow_run_logger

    raised = None
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(flow, parameters=parameters)
        try:
            run_flow(flow, flow_run=run, error_logger=flow_run_logger(flow_run=run))
        except Exception as error:
            raised = error
        return client.read_flow_run(run.id), raised


def test_a_bad_value_that_reaches_the_flow_fails_with_the_plain_message(tmp_path, prefect_records):
    from tuneline.core.params import ParamsError
    from tuneline.orchestration.flow import pipeline

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    # Within every field's limits; together with the buckets no crop of 4096 fits (a cross-field rule).
    overrides = {"autoencoder": {"enabled": True, "crop_size": 4096}}
    stored, raised = run_as_the_runner_does(pipeline, {"root": str(tmp_path), "overrides": overrides})
    assert isinstance(raised, ParamsError)
    assert stored.state.name == "Failed" and "autoencoder.crop_size: 4096" in stored.state.message
    errors = [r for r in prefect_records if r.levelno >= logging.ERROR]
    assert [r.getMessage().splitlines()[0] for r in errors] == [
        f"configuration error: {tmp_path / 'params.yaml'} with overrides is invalid:"]
    assert "autoencoder.crop_size: 4096 is longer than the shorter side of every bucket" in errors[0].getMessage()
    assert not [r.getMessage() for r in prefect_records if r.exc_info]  # no traceback
    assert not [r.getMessage() for r in prefect_records if "ParamsError" in r.getMessage()]


# A stage that warns the way a stage does (core.logs' terminal line), then waits to be stopped
# and exits as the trainer does after its checkpoint.
WAITING_STAGE = """
import logging, pathlib, signal, sys, time
from tuneline.core import logs
logs.configure(pathlib.Path('.'), 'waiting')
logging.getLogger('tuneline.tiny').warning('using tiny-sdxl: RANDOM weights')
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
print('ready', flush=True)
time.sleep(60)
"""


def _waiting_stage(root: str) -> Any:
    """Run a stage process as run_stage does (its own group, its output to the run log) and cancel
    it as Prefect's runner does (SIGTERM to the flow's process, which the driver passes on)."""
    from prefect import get_run_logger

    from tuneline.orchestration.flow import _stopped, stage_output
    from tuneline.orchestration.runner import StageStopped, run_stage_process

    logger = get_run_logger()
    to_log = stage_output(logger)
    ready = threading.Event()

    def echo(line: str) -> None:
        to_log(line)
        if line == "ready":
            ready.set()

    def started(pgid: int) -> None:  # the driver holds SIGTERM from now until the stage has exited
        threading.Thread(target=lambda: ready.wait(30) and os.kill(os.getpid(), signal.SIGTERM), daemon=True).start()

    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    try:
        run_stage_process("waiting", Path(root) / "params.yaml", Path(root), env=env, on_start=started, echo=echo,
                          command=[sys.executable, "-c", WAITING_STAGE])
    except StageStopped as stopped:
        return _stopped(stopped, Path(root) / "stopped.json", "the same run again", logger)
    raise AssertionError("the stage was not stopped")


def _cancellable(root: str) -> Any:
    """The pipeline's ending for a stage stopped on request, around one waiting stage."""
    from prefect import task
    from prefect.runtime import flow_run

    from tuneline.orchestration.flow import ORDERLY_ENDS, stopped_flow

    ORDERLY_ENDS.watch(flow_run.get_id())
    state = task(name="waiting")(_waiting_stage)(root, return_state=True)
    return stopped_flow(state) if state.is_cancelled() else state.result()


def test_an_orderly_cancel_logs_no_error_and_warnings_arrive_at_warning(tmp_path, prefect_records):
    from prefect import flow
    from prefect.exceptions import CancelledRun

    from tuneline.core.logs import level_of

    assert level_of("warning: w") == (logging.WARNING, "w") and level_of("error: e") == (logging.ERROR, "e")
    assert level_of("stage table") == (logging.INFO, "stage table")

    stored, raised = run_as_the_runner_does(flow(name="tuneline-cancel-check")(_cancellable), {"root": str(tmp_path)})
    assert isinstance(raised, CancelledRun)
    assert (stored.state.name, stored.state.message) == ("Cancelled", "stage waiting stopped on request (signal 15)")
    lines = [(r.levelname, r.name, r.getMessage()) for r in prefect_records if r.name.startswith("prefect.")]
    assert not [line for line in lines if line[0] in ("ERROR", "CRITICAL")], lines
    assert not [r for r in prefect_records if r.exc_info]
    # The stage's warning (its terminal line `warning: ...`) reaches Prefect's logger at WARNING.
    assert ("WARNING", "prefect.task_runs", "using tiny-sdxl: RANDOM weights") in lines
    assert ("WARNING", "prefect.task_runs", "stage waiting stopped on request (signal 15). To resume, run: "
            "the same run again") in lines
    assert ("WARNING", "prefect.task_runs", "Finished in state Cancelled('stage waiting stopped on request "
            "(signal 15)')") in lines
    assert ("INFO", "prefect.flow_runs", "Finished in state Cancelled('stage waiting stopped on request "
            "(signal 15)')") in lines
