"""Settings that become file or folder names stay inside the project: each is refused at validation
with its rule named (`tuneline check`, every stage, the Prefect form's overrides), or made safe as
data set names are. Destinations the user chooses on purpose (export.copy_to, model folders, MLflow
stores) stay explicit paths; only a NUL byte, which no path can hold, is refused there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from test_flows import demo_project, prefect_env  # noqa: F401  (autouse: ephemeral Prefect, one PREFECT_HOME)
from tuneline.config import validate_params
from tuneline.core.params import ParamsError

BASE: dict[str, Any] = {"datasets": [{"name": "a", "path": "data/raw/a"}]}
DOT_DOT, ABSOLUTE, SEPARATOR, BACKSLASH, NUL = "../../evil_out/x", "/tmp/evil_out/x", "sub/x", "sub\\x", "x\x00y"


def with_value(field: str, value: Any) -> dict[str, Any]:
    """BASE with `field` (export.name, store_dir, datasets[].path, ...) set to `value`."""
    data = {**BASE, "datasets": [dict(BASE["datasets"][0])]}
    if field.startswith("datasets[]."):
        data["datasets"][0][field.removeprefix("datasets[].")] = value
    elif "." in field:
        section, key = field.split(".")
        data[section] = {key: [value] if field == "export.copy_to" else value}
    else:
        data[field] = value
    return data


def message(data: dict[str, Any]) -> str:
    with pytest.raises(ParamsError) as caught:
        validate_params(data)
    return str(caught.value)


FILE_NAME_RULE = "a file name is one name inside its output folder"
PROJECT_PATH_RULE = "a project path is relative to the project root and stays inside it"


@pytest.mark.parametrize("value, why", [
    (DOT_DOT, "has a path separator (/)"), (ABSOLUTE, "has a path separator (/)"),
    (SEPARATOR, "has a path separator (/)"), (BACKSLASH, "has a path separator (\\)"), (NUL, "has a NUL byte"),
    ("..", "is '..', a folder"), (".", "is '.', a folder"), (".hidden", "starts with a dot"), ("", "is empty"),
    ("a\nb", "has the control character '\\n'"), ("x" * 201, "is 201 bytes long"),
])
def test_export_name_is_one_file_name(value, why):
    text = message(with_value("export.name", value))
    assert f"export.name: not a file name: it {why}; {FILE_NAME_RULE}" in text
    assert f"(got {value!r})" in text


def test_export_names_people_use_stay_valid():
    for name in ("tuneline", "My Style v2", "café-lora_1.5", "x" * 200):
        assert validate_params(with_value("export.name", name)).export.name == name


@pytest.mark.parametrize("field", ["store_dir", "datasets[].path", "render.prompts_file"])
@pytest.mark.parametrize("value, why", [
    (DOT_DOT, "has a '..' component"), ("..", "has a '..' component"), ("data/../../x", "has a '..' component"),
    (ABSOLUTE, "is an absolute path"), ("~/photos", "starts with ~ (a home folder)"),
    (BACKSLASH, "has a backslash"), (NUL, "has a NUL byte"),
])
def test_project_paths_are_refused_outside_the_project(field, value, why):
    text = message(with_value(field, value))
    label = field.replace("[]", "[a]")
    assert f"{label}: not a path inside the project: it {why}; {PROJECT_PATH_RULE}" in text


@pytest.mark.parametrize("field", ["store_dir", "datasets[].path", "render.prompts_file"])
def test_project_paths_may_have_folders(field):
    params = validate_params(with_value(field, SEPARATOR))  # a separator is what a path is made of
    value = {"store_dir": lambda: params.store_dir, "datasets[].path": lambda: params.datasets[0].path,
             "render.prompts_file": lambda: params.render.prompts_file}[field]()
    assert str(value) == SEPARATOR


@pytest.mark.parametrize("name, folder", [
    (DOT_DOT, "evil_out_x"), (ABSOLUTE, "tmp_evil_out_x"), (SEPARATOR, "sub_x"), (BACKSLASH, "sub_x"),
    (NUL, "x_y"), ("..x", "x"),
])
def test_data_set_names_are_made_safe_folders(tmp_path, name, folder):
    """Data set names are shown as given and used as folders made safe (tuneline.core.fsutil.safe_name)."""
    params = validate_params(with_value("datasets[].name", name))
    assert params.datasets[0].name == name and params.datasets[0].folder == folder
    assert (tmp_path / "data/ingested" / params.datasets[0].folder).resolve().parent == (tmp_path / "data/ingested")
    assert "no usable characters" in message(with_value("datasets[].name", ".."))


@pytest.mark.parametrize("field", ["export.copy_to", "model.base", "model.vae", "model.config", "caption.model",
                                   "tracking.tracking_uri", "tracking.artifact_root"])
def test_chosen_destinations_stay_explicit_paths_but_never_hold_nul(field):
    for value in (DOT_DOT, ABSOLUTE, SEPARATOR):  # the user's own choice, anywhere
        validate_params(with_value(field, value))
    label = f"{field}[0]" if field == "export.copy_to" else field
    assert f"{label}: not a path: it has a NUL byte" in message(with_value(field, NUL))


def project(root: Path, **sections: Any) -> Path:
    (root / "data/raw/a").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump({**BASE, **sections}), "utf-8")
    return root / "params.yaml"


def test_the_measured_escape_is_refused_by_check_and_by_export(tmp_path, capsys):
    """`export.name: ../../evil_out/x` passed check and export wrote two folders above the project."""
    from tuneline.cli import main

    root = tmp_path / "one" / "two" / "project"
    project(root, export={"name": DOT_DOT})
    for command in (["check", "--no-memory"], ["export"]):
        assert main(["--root", str(root), "--params", str(root / "params.yaml"), *command]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert "export.name: not a file name: it has a path separator (/)" in out, out
    assert not (tmp_path / "one" / "evil_out").exists() and not (root / "export").exists()


def test_overrides_of_the_form_get_the_same_rules():
    """The Prefect form's overrides are merged into params.yaml and validated like it."""
    from tuneline.orchestration.overrides import apply_overrides, overrides_model

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text("utf-8"))
    for overrides in ({"export.name": "../x"}, {"export": {"name": "../x"}},
                      overrides_model()(**{"export": {"name": "../x"}})):
        with pytest.raises(ParamsError, match=r"export\.name: not a file name: it has a path separator"):
            apply_overrides(data, overrides)
    with pytest.raises(ParamsError, match=r"store_dir: not a path inside the project: it is an absolute path"):
        apply_overrides(data, {"store_dir": "/tmp/store"})


def test_the_flow_refuses_an_escaping_export_name_before_any_task(tmp_path):
    from tuneline.orchestration.flow import pipeline

    root = demo_project(tmp_path / "project", ("models", "scan", "ingest"))
    with pytest.raises(ParamsError, match=r"export\.name: not a file name: it has a path separator \(/\)"):
        pipeline(root=str(root), overrides={"export.name": "../x"})
    assert not (root / "data/ingested").exists() and not (root / ".tuneline/prefect/records").exists()
    assert not (tmp_path / "x.safetensors").exists()
