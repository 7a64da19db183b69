from pathlib import Path

import pytest

from tuneline.cli import main
from tuneline.config import load_params, validate_params
from tuneline.core.params import ParamsError, parse_resolution

BASE = {"datasets": [{"name": "faces", "path": "data/raw/faces"}]}


def error_of(data) -> str:
    with pytest.raises(ParamsError) as caught:
        validate_params(data)
    return str(caught.value)


def test_shipped_params_are_valid():
    params = load_params(Path(__file__).parents[1] / "params.yaml")
    assert [d.name for d in params.datasets] == ["shapes", "stripes"]
    assert params.bucket_settings_for(params.datasets[1]).crop == "random"


def test_unknown_key_names_closest_and_allowed_keys():
    message = error_of({**BASE, "bucket": {"divisble_by": 32}})
    assert "bucket.divisble_by: unknown key" in message
    assert "Did you mean 'divisible_by'?" in message
    assert "small_buckets" in message  # the allowed keys are listed


def test_unknown_key_in_a_data_set_is_named_by_data_set():
    message = error_of({"datasets": [{"name": "faces", "path": "x", "triger_word": "ohwx"}]})
    assert "datasets[faces].triger_word: unknown key. Did you mean 'trigger_word'?" in message


def test_unknown_section_and_override_keys():
    message = error_of({**BASE, "bukcet": {}})
    assert "bukcet: unknown key. Did you mean 'bucket'?" in message
    message = error_of({"datasets": [{"name": "a", "path": "x", "bucket": {"crops": "center"}}]})
    assert "datasets[a].bucket.crops: unknown key. Did you mean 'crop'?" in message


def test_bad_values_list_allowed_values():
    message = error_of({**BASE, "bucket": {"crop": "centre", "small_buckets": "keep"}})
    assert "bucket.crop: Input should be 'center' or 'random' (got 'centre')" in message
    assert "bucket.small_buckets: Input should be 'merge' or 'drop' (got 'keep')" in message
    assert "ingest.background" in error_of({**BASE, "ingest": {"background": "blurple"}})
    assert "datasets[faces].repeats" in error_of({"datasets": [{"name": "faces", "path": "x", "repeats": 0}]})


def test_resolutions_must_fit_the_grid_also_in_overrides():
    assert "not a multiple of divisible_by=64" in error_of({**BASE, "bucket": {"resolutions": ["1000x1000"]}})
    message = error_of({"datasets": [{"name": "a", "path": "x", "bucket": {"resolutions": ["100x64"]}}]})
    assert "datasets[a].bucket: " in message and "{'datasets'" not in message
    assert parse_resolution("1024 x 768") == (1024, 768)
    assert parse_resolution(512) == (512, 512)


def test_data_set_names_become_safe_folders():
    params = validate_params({"datasets": [{"name": "../../etc/passwd", "path": "x"}, {"name": "My Set", "path": "y"}]})
    folders = [d.folder for d in params.datasets]
    assert folders == ["etc_passwd", "My_Set"]
    assert all("/" not in f and not f.startswith(".") for f in folders)
    assert "map to the same folder name" in error_of(
        {"datasets": [{"name": "a b", "path": "x"}, {"name": "a/b", "path": "y"}]})
    assert "no usable characters" in error_of({"datasets": [{"name": "..", "path": "x"}]})


def test_batch_sizes_keys_are_normalised():
    params = validate_params({**BASE, "bucket": {"batch_sizes": {"1024 x 1024": 2}, "batch_size": 3}})
    assert params.bucket.batch_size_for((1024, 1024)) == 2
    assert params.bucket.batch_size_for((1152, 896)) == 3


def test_cli_check_fails_before_work(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("datasets:\n  - {name: a, path: x}\nbucket:\n  batchsize: 2\n")
    assert main(["--params", str(tmp_path / "params.yaml"), "check"]) == 2
    assert "Did you mean 'batch_size'?" in capsys.readouterr().out
    (tmp_path / "params.yaml").write_text("datasets: [\n")
    assert main(["--params", str(tmp_path / "params.yaml"), "ingest"]) == 2
    assert "not valid YAML" in capsys.readouterr().out


def test_missing_data_set_folder_stops_before_work(project, capsys):
    project.params()
    project.raw("alpha").rmdir()
    assert main(["--params", str(project.root / "params.yaml"), "--root", str(project.root), "ingest"]) == 2
    assert "datasets[alpha].path: folder" in capsys.readouterr().out
    assert not (project.root / "data/ingested").exists()


def test_unquoted_yaml_no_is_mixed_precision_no():
    # `dvc exp run -S` rewrites params.yaml and drops the quotes; YAML 1.1 then reads `no` as false.
    import yaml

    from tuneline.config import validate_params

    data = yaml.safe_load("datasets: [{name: a, path: data/raw/a}]\ntrain: {mixed_precision: no}\n")
    assert data["train"]["mixed_precision"] is False
    assert validate_params(data).train.mixed_precision == "no"
