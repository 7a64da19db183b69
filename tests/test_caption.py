"""Stage caption: Florence-2 captions (tiny random model), sidecars, trigger words, hand edits, caching."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import item_bytes, save_photo
from tuneline.stages.caption import florence as florence_runner
from tuneline.stages.caption.text import clean_caption, with_trigger


@pytest.fixture
def five(project):
    """alpha: a0 (sidecar), a1, a2; beta: b0, b1. alpha's trigger word is 'trig'."""
    for index in range(3):
        save_photo(project.raw("alpha") / f"a{index}.jpg", (200 + 20 * index, 140), index, quality=90)
    for index in range(2):
        save_photo(project.raw("beta") / f"b{index}.png", (120, 200), 10 + index)
    (project.raw("alpha") / "a0.txt").write_text("a cat on a mat\n")
    project.params_data["datasets"][0]["trigger_word"] = "trig"
    project.params_data["caption"] = {"batch_size": 4, "num_beams": 1, "max_new_tokens": 8}
    project.ingest()
    project.bucket()
    return project


def caption(project, **settings):
    from tuneline.stages.caption.stage import run as run_caption

    params = project.params(caption=settings) if settings else project.params()
    return run_caption(params, project.root, project.root / "data/bucketed", project.root / "data/captioned",
                       project.root / "metrics")


def records(project) -> dict[str, dict]:
    """Captioned manifest records by source file name ('a0.jpg')."""
    return {Path(r["source"]).name: r for r in project.manifest("data/captioned")}


def text_file(project, record) -> Path:
    """Where an older tuneline wrote the record's caption (data/captioned/<data set>/<id>.txt)."""
    return project.root / "data/captioned" / record["dataset"] / f"{record['id']}.txt"


def as_older_tuneline_wrote_it(project) -> dict[str, dict]:
    """data/captioned as tuneline wrote it before packs: a `<id>.txt` per item, named by `caption_file`."""
    from tuneline.core.manifest import write_jsonl

    older = []
    for record in project.manifest("data/captioned"):
        record = {**record, "caption_file": f"{record['dataset']}/{record['id']}.txt"}
        text_file(project, record).parent.mkdir(parents=True, exist_ok=True)
        text_file(project, record).write_text(record["caption"] + "\n", "utf-8")
        older.append(record)
    write_jsonl(project.root / "data/captioned/manifest.jsonl", older)
    return records(project)


def test_model_captions_are_stored_and_reused(five, monkeypatch):
    loaded = []
    real_load = florence_runner.load_florence
    monkeypatch.setattr(florence_runner, "load_florence", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])

    first = caption(five)
    # The sidecar caption is taken as given, not "reused from store" (the store was empty).
    assert (first.computed, first.reused, first.given, first.extra["model_loaded"]) == (4, 0, 1, True)
    assert len(loaded) == 1 and loaded[0].model is None  # unloaded when the stage ended
    found = records(five)
    assert {name: r["caption_source"] for name, r in found.items()} == {
        "a0.jpg": "sidecar", "a1.jpg": "model", "a2.jpg": "model", "b0.png": "model", "b1.png": "model"}
    for name, record in found.items():
        assert not text_file(five, record).exists()  # captions live in the manifest: no file per item
        pack = record["image"]["pack"]
        assert os.path.samefile(five.root / "data/captioned" / pack, five.root / "data/bucketed" / pack)  # a link
        assert item_bytes(five.root / "data/captioned", record)[:8] == b"\x89PNG\r\n\x1a\n"
        if record["caption_source"] == "model":
            assert record["model_caption"] and record["caption_key"]
    assert "RANDOM" in " ".join(first.warnings)
    assert json.loads((five.root / "metrics/caption.json").read_text()) == {"items": 5, "rejected": 0}
    metrics = json.loads((five.root / "reports/caption.json").read_text())
    assert {k: metrics[k] for k in ("computed", "model_captions_reused", "from_sidecar", "defaulted",
                                    "hand_edited", "random_tiny_model")} == {
        "computed": 4, "model_captions_reused": 0, "from_sidecar": 1, "defaulted": 0, "hand_edited": 0,
        "random_tiny_model": True}

    before = (five.root / "data/captioned/manifest.jsonl").read_bytes()
    again = caption(five)
    assert (again.computed, again.extra["model_captions_reused"], again.extra["model_loaded"]) == (0, 4, False)
    assert len(loaded) == 1
    assert (five.root / "data/captioned/manifest.jsonl").read_bytes() == before

    # Generation settings are part of the key: more tokens recompute every model caption.
    assert caption(five, max_new_tokens=9).computed == 4


def test_trigger_word_once_in_front_and_changing_it_runs_no_model(five):
    (five.raw("alpha") / "a0.txt").write_text("Trig, a cat on a mat")  # already tagged, other case
    five.ingest(), five.bucket()
    caption(five)
    found = records(five)
    assert found["a0.jpg"]["caption"] == "Trig, a cat on a mat"
    assert found["a1.jpg"]["caption"] == f"trig, {found['a1.jpg']['model_caption']}"
    assert found["b0.png"]["caption"] == found["b0.png"]["model_caption"]  # beta has no trigger word

    five.params_data["datasets"][0]["trigger_word"] = "newtrig"
    report = caption(five)
    assert (report.computed, report.extra["model_loaded"]) == (0, False)
    found = records(five)
    assert found["a0.jpg"]["caption"] == "newtrig, Trig, a cat on a mat"
    assert found["a2.jpg"]["caption"] == f"newtrig, {found['a2.jpg']['model_caption']}"


def test_sidecars_kept_in_fill_and_replaced_in_overwrite(five):
    assert caption(five).computed == 4
    assert records(five)["a0.jpg"]["caption"] == "trig, a cat on a mat"
    report = caption(five, mode="overwrite")
    assert report.computed == 1  # only a0 is new to the model; the other four come from the store
    a0 = records(five)["a0.jpg"]
    assert a0["caption_source"] == "model" and a0["sidecar_caption"] == "a cat on a mat"
    assert a0["caption"] == f"trig, {a0['model_caption']}"


def test_sidecar_only_never_loads_the_model(five, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("sidecar_only must not load a model")

    monkeypatch.setattr(florence_runner, "load_florence", no_model)
    five.params_data["datasets"] = five.params_data["datasets"][:1]  # beta is gone from params
    report = caption(five, mode="sidecar_only", default_caption="a photo")
    assert (report.computed, report.extra["model_loaded"], report.extra["defaulted"]) == (0, False, 2)
    assert [r["reason"] for r in report.rejected] == ["data set 'beta' is not in params.yaml any more"] * 2
    found = records(five)
    assert {n: (r["caption_source"], r["caption"]) for n, r in found.items()} == {
        "a0.jpg": ("sidecar", "trig, a cat on a mat"), "a1.jpg": ("default", "trig, a photo"),
        "a2.jpg": ("default", "trig, a photo")}
    assert len(five.rejected("data/captioned")) == 2


def test_empty_model_caption_falls_back_to_the_default(five, monkeypatch):
    monkeypatch.setattr(florence_runner, "clean_caption", lambda text: "")
    report = caption(five, default_caption="a picture")
    assert (report.computed, report.extra["defaulted"]) == (4, 4)
    b0 = records(five)["b0.png"]
    assert (b0["caption_source"], b0["caption"], b0["model_caption"]) == ("default", "a picture", "")


def edit_warnings(report) -> list[str]:
    """The run's warnings, less the tiny random model's."""
    return [w for w in report.warnings if "tiny RANDOM-weight" not in w]


def edit_file(project, record) -> Path:
    """Where a hand edit of `record`'s caption goes: data/caption_edits/<data set>/<id>.txt."""
    return project.root / "data/caption_edits" / record["dataset"] / f"{record['id']}.txt"


def write_edit(project, record, text: str) -> None:
    edit_file(project, record).parent.mkdir(parents=True, exist_ok=True)
    edit_file(project, record).write_text(text, "utf-8")


def test_edits_in_the_edits_folder_win_in_every_mode_and_survive_rebuilt_outputs(five):
    caption(five)
    found = records(five)
    write_edit(five, found["a1.jpg"], "my own words\r\n")
    write_edit(five, found["a0.jpg"], "trig, a cat, edited")  # a sidecar caption, edited

    report = caption(five)
    assert (report.computed, report.extra["hand_edits_moved"], report.extra["hand_edited"]) == (0, 0, 2)
    assert edit_warnings(report) == []
    found = records(five)
    assert (found["a1.jpg"]["caption_source"], found["a1.jpg"]["caption"]) == ("hand_edited", "my own words")
    assert found["a0.jpg"]["caption"] == "trig, a cat, edited"  # verbatim: no second trigger word

    # Rebuilt output (rm -rf, or a dvc checkout of a copy without the edit): the edit is an input, it stays.
    shutil.rmtree(five.root / "data/captioned")
    report = caption(five, mode="overwrite")  # hand edits win in every mode
    assert (report.extra["hand_edits_moved"], report.extra["hand_edited"]) == (0, 2)
    assert records(five)["a1.jpg"]["caption"] == "my own words"

    # Emptying the file goes back to the automatic caption.
    edit_file(five, records(five)["a1.jpg"]).write_text("\n")
    report = caption(five)
    a1 = records(five)["a1.jpg"]
    assert (report.extra["hand_edited"], a1["caption_source"]) == (1, "model")
    assert a1["caption"] == f"trig, {a1['model_caption']}"


def test_a_caption_edited_in_place_moves_to_the_edits_folder_and_dvcs_cached_copy_gets_its_bytes_back(five):
    """As DVC leaves the output with `cache.type: hardlink`: each file a read-only link to its cache
    object (.dvc/cache/files/md5/<md5>). An edit in place (root ignores the read-only bit) changes the
    cache object too; the next run keeps the edit in the edits folder and writes the cached bytes back."""
    import hashlib

    caption(five)
    found = as_older_tuneline_wrote_it(five)
    path = text_file(five, found["a1.jpg"])
    original = path.read_bytes()
    digest = hashlib.md5(original).hexdigest()
    (five.root / ".dvc").mkdir()
    (five.root / ".dvc/config").write_text("[core]\n    no_scm = true\n")
    cached = five.root / ".dvc/cache/files/md5" / digest[:2] / digest[2:]
    cached.parent.mkdir(parents=True)
    os.link(path, cached)
    os.chmod(path, 0o644)  # what `:w!` or a root shell does to a read-only file
    path.write_text("my own words\n", "utf-8")
    os.chmod(path, 0o444)
    assert cached.read_bytes() == b"my own words\n"  # the cache object, changed under its old hash
    path.unlink()  # DVC copies a changed output before it reruns the stage: the link is gone
    path.write_text("my own words\n", "utf-8")

    report = caption(five)
    assert cached.read_bytes() == original and (cached.stat().st_mode & 0o777) == 0o444
    assert edit_file(five, found["a1.jpg"]).read_text() == "my own words\n"
    assert (report.extra["hand_edits_moved"], report.extra["hand_edited"]) == (1, 1)
    assert records(five)["a1.jpg"]["caption"] == "my own words"
    [warning] = edit_warnings(report)
    assert "1 caption(s) edited in place in data/captioned moved to data/caption_edits/" in warning
    assert "went through into 1 of DVC's cached copies, which got their bytes back" in warning

    # Edited in place and in the folder since the last run: the folder's edit is kept, the clash named.
    write_edit(five, found["a1.jpg"], "the folder's words")
    found = as_older_tuneline_wrote_it(five)
    text_file(five, found["a1.jpg"]).write_text("words in place\n", "utf-8")
    report = caption(five)
    assert records(five)["a1.jpg"]["caption"] == "the folder's words"
    assert report.extra["hand_edits_moved"] == 0
    assert edit_warnings(report) == [
        f"data/captioned/{found['a1.jpg']['caption_file']} was edited in place while "
        f"data/caption_edits/{found['a1.jpg']['caption_file']} was edited too: the edit in data/caption_edits/ is kept"]


def test_edits_an_older_tuneline_kept_in_the_store_move_to_the_folder(five):
    caption(five)
    found = records(five)
    legacy = five.root / ".tuneline/store/caption-edits"
    legacy.mkdir(parents=True)
    (legacy / f"{found['a2.jpg']['id']}.txt").write_text("kept by an older version\n")
    report = caption(five)
    assert edit_file(five, found["a2.jpg"]).read_text() == "kept by an older version\n"
    assert not list(legacy.iterdir())
    assert (report.extra["hand_edits_moved"], records(five)["a2.jpg"]["caption"]) == (1, "kept by an older version")
    assert any("kept by an older tuneline in the item store moved to data/caption_edits/" in w for w in report.warnings)


def test_edits_that_match_no_image_are_named(five):
    caption(five)
    found = records(five)
    write_edit(five, found["b0.png"], "a kept edit")
    (five.root / "data/caption_edits/beta/0000dead.txt").write_text("an image that was replaced")
    (five.root / "data/caption_edits/README.md").write_text("not an edit")
    report = caption(five)
    assert report.extra["hand_edited"] == 1
    assert edit_warnings(report) == ["1 caption edit(s) in data/caption_edits/ match no image (replaced or removed; "
                               "an edit follows the image's content): beta/0000dead.txt"]


def test_an_older_output_put_back_is_not_a_hand_edit(five):
    caption(five)
    old = five.root / "old-captioned"
    shutil.copytree(five.root / "data/captioned", old)
    five.params_data["datasets"][0]["trigger_word"] = "other"
    caption(five)
    # As `dvc checkout` of an earlier version: .txt files and manifest from the same run.
    shutil.rmtree(five.root / "data/captioned")
    shutil.copytree(old, five.root / "data/captioned")
    report = caption(five)
    assert (report.extra["hand_edits_moved"], report.extra["hand_edited"]) == (0, 0)
    assert records(five)["a1.jpg"]["caption"].startswith("other, ")
    assert not (five.root / "data/caption_edits").exists()


def test_adding_one_image_captions_one(five):
    caption(five)
    save_photo(five.raw("beta") / "new.png", (130, 210), 99)
    five.ingest(), five.bucket()
    report = caption(five)
    assert (report.computed, report.extra["model_captions_reused"], report.produced) == (1, 4, 6)


def test_out_of_memory_halves_the_batch(five, monkeypatch):
    import torch
    from transformers import Florence2ForConditionalGeneration

    real_generate = Florence2ForConditionalGeneration.generate
    sizes = []

    def generate(self, *args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if sizes[-1] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(Florence2ForConditionalGeneration, "generate", generate)
    report = caption(five, batch_size=4)
    assert sizes == [4, 2, 1, 1, 1, 1]
    assert report.computed == 4 and report.extra["batch_halvings"] == 2
    assert all(r["caption"] for r in records(five).values())
    assert [w for w in report.warnings if "out of memory" in w] == [
        "out of memory at caption batch size 4; going on with 2 (CUDA out of memory. Tried to allocate 2.00 GiB)",
        "out of memory at caption batch size 2; going on with 1 (CUDA out of memory. Tried to allocate 2.00 GiB)"]


def test_in_batches_gives_up_at_one_and_passes_other_errors():
    halved = []

    def always_oom(batch):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate; out of memory")

    with pytest.raises(florence_runner.CaptionOutOfMemory, match="caption.batch_size"):
        list(florence_runner.in_batches([1, 2, 3], 3, always_oom, lambda *a: halved.append(a[:2])))
    assert halved == [(3, 1)]

    def broken(batch):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(florence_runner.in_batches([1, 2], 2, broken, lambda *a: halved.append(a)))
    assert list(florence_runner.in_batches(list(range(5)), 2, lambda b: [x * 10 for x in b], print)) == [
        (0, [0, 10]), (2, [20, 30]), (4, [40])]


@pytest.mark.parametrize(("raw", "clean"), [
    ("</s><s>A cat on a mat.</s><pad><pad>", "A cat on a mat."),
    ("<CAPTION>a dog<loc_12><loc_999></s>", "a dog"),
    ("The image shows a red car parked on a street.", "a red car parked on a street."),
    ("This image is of two dogs", "two dogs"),
    ("In this image, we can see a house", "a house"),
    ("In this picture there are three birds", "three birds"),
    ("This is an image of a lake", "a lake"),
    ("The image depicts:  a   bridge\n at night ", "a bridge at night"),
    ("The painting shows a woman", "The painting shows a woman"),  # says something: kept
    ("<MORE_DETAILED_CAPTION></s>", ""),
    ("The image shows .", ""),
    ("   ", ""),
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


@pytest.mark.parametrize(("trigger", "caption", "final"), [
    ("trig", "a cat", "trig, a cat"),
    ("trig", "Trig, a cat", "Trig, a cat"),
    ("trig", "TRIG a cat", "TRIG a cat"),
    ("trig", "trigger happy cat", "trig, trigger happy cat"),  # starts with it, but not as a word
    ("trig", "", "trig"),
    ("ohwx man", "ohwx man, smiling", "ohwx man, smiling"),
    (None, "  a  cat ", "a cat"),
    ("", "a cat", "a cat"),
])
def test_with_trigger(trigger, caption, final):
    assert with_trigger(trigger, caption) == final


def test_bad_settings_name_the_allowed_values(project):
    from tuneline.config import validate_params
    from tuneline.core.params import ParamsError

    data = {**project.params_data, "caption": {"task": "<CAPTIONS>", "mode": "fil", "dtype": "fp8"}}
    with pytest.raises(ParamsError) as error:
        validate_params(data)
    message = str(error.value)
    for expected in ("caption.task", "'<CAPTION>'", "caption.mode", "'sidecar_only'", "caption.dtype", "'bf16'"):
        assert expected in message
    assert florence_runner.resolve_device_dtype("cpu", "auto") == ("cpu", "fp32")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ParamsError, match="caption.device: 'cuda'"):
            florence_runner.resolve_device_dtype("cuda", "auto")


def test_cli_runner_writes_the_stage_folder(five):
    from tuneline.orchestration import registry

    caption = registry.stage("caption")
    assert (caption.reads, caption.writes) == (("data/bucketed",), "data/captioned")
    report = caption.run(five.params(), five.root)
    assert report.computed == 4 and len(five.manifest("data/captioned")) == 5
    assert (five.root / "metrics/caption.json").is_file()


def test_tuneline_item_finds_an_image_extracts_its_crop_and_starts_a_caption_edit(five, tmp_path, capsys):
    """With item files in packs, `tuneline item` is how a person looks at one image and edits its caption."""
    from tuneline.cli import main

    caption(five, mode="sidecar_only")
    a0 = records(five)["a0.jpg"]
    root = ["--root", str(five.root)]
    assert main([*root, "item", "data/raw/alpha/a0.jpg", "--extract", str(tmp_path / "out"), "--edit"]) == 0
    shown = capsys.readouterr().out
    assert f"alpha/{a0['id']}  (from data/raw/alpha/a0.jpg)" in shown
    assert "caption (sidecar): trig, a cat on a mat" in shown and "the current caption copied there" in shown
    assert (tmp_path / "out" / f"{a0['id']}.png").read_bytes() == item_bytes(five.root / "data/captioned", a0)
    assert edit_file(five, a0).read_text() == "trig, a cat on a mat\n"

    edit_file(five, a0).write_text("trig, a tabby cat on a red mat\n")
    assert main([*root, "item", f"alpha/{a0['id']}", "--edit"]) == 0  # by id too; an edit is never overwritten
    assert "(already there)" in capsys.readouterr().out
    assert caption(five, mode="sidecar_only").extra["hand_edited"] == 1
    assert records(five)["a0.jpg"]["caption"] == "trig, a tabby cat on a red mat"

    assert main([*root, "item", "data/raw/alpha/nope.jpg"]) == 1
    assert "no bucketed item is 'data/raw/alpha/nope.jpg': give a raw image path" in capsys.readouterr().out
