"""Only what changed is recomputed: counts of computed vs reused items, never timings."""

import os
import shutil

import pytest

from conftest import save_photo
from tuneline.core.fsutil import rebuilt_dir


@pytest.fixture
def five(project):
    for index in range(3):
        save_photo(project.raw("alpha") / f"a{index}.jpg", (400 + 40 * index, 280), index, quality=90)
    for index in range(2):
        save_photo(project.raw("beta") / f"b{index}.png", (240, 480), 10 + index)
    (project.raw("alpha") / "a0.txt").write_text("first caption")
    first = (project.ingest(), project.bucket())
    assert [(r.computed, r.reused) for r in first] == [(5, 0), (5, 0)]
    return project


def counts(project):
    ingest, bucket = project.ingest(), project.bucket()
    return (ingest.computed, ingest.reused), (bucket.computed, bucket.reused)


def test_unchanged_rerun_computes_nothing(five):
    before = (five.root / "data/bucketed/manifest.jsonl").read_bytes()
    assert counts(five) == ((0, 5), (0, 5))
    assert (five.root / "data/bucketed/manifest.jsonl").read_bytes() == before


def test_adding_one_image_costs_one(five):
    save_photo(five.raw("beta") / "new.jpg", (300, 500), 99, quality=90)
    assert counts(five) == ((1, 5), (1, 5))
    assert len(five.manifest("data/bucketed")) == 6


def test_editing_one_image_costs_one_and_drops_the_old_result(five):
    old = {r["source"]: r["id"] for r in five.manifest("data/bucketed")}
    save_photo(five.raw("alpha") / "a1.jpg", (440, 280), 1234, quality=90)
    assert counts(five) == ((1, 4), (1, 4))
    new = {r["source"]: r["id"] for r in five.manifest("data/bucketed")}
    assert new["data/raw/alpha/a1.jpg"] != old["data/raw/alpha/a1.jpg"]
    assert not (five.root / "data/bucketed/alpha" / f"{old['data/raw/alpha/a1.jpg']}.png").exists()


def test_removing_one_image_costs_nothing(five):
    (five.raw("alpha") / "a2.jpg").unlink()
    assert counts(five) == ((0, 4), (0, 4))
    assert len(os.listdir(five.root / "data/bucketed/alpha")) == 2


def test_touching_or_renaming_a_file_costs_nothing(five):
    os.utime(five.raw("alpha") / "a0.jpg", (1, 1))
    shutil.move(five.raw("beta") / "b0.png", five.raw("beta") / "renamed.png")
    assert counts(five) == ((0, 5), (0, 5))
    assert "data/raw/beta/renamed.png" in {r["source"] for r in five.manifest("data/bucketed")}


def test_caption_edit_changes_manifests_only(five):
    (five.raw("alpha") / "a0.txt").write_text("a better caption")
    assert counts(five) == ((0, 5), (0, 5))
    captions = {r["source"]: r["caption"] for r in five.manifest("data/bucketed")}
    assert captions["data/raw/alpha/a0.jpg"] == "a better caption"


def test_bucket_setting_recomputes_only_what_it_affects(five):
    data = five.params_data
    data["datasets"][1]["bucket"] = {"crop": "random"}  # beta only
    ingest, bucket = five.ingest(), five.bucket()
    assert (ingest.computed, bucket.computed, bucket.reused) == (0, 2, 3)
    five.params_data["bucket"]["resample"] = "bicubic"  # every image's pixels change
    assert five.bucket().computed == 5
    five.params_data["bucket"]["batch_size"] = 1  # no effect on pixels
    assert five.bucket().computed == 0


def test_ingest_thresholds_need_no_new_decode(five):
    five.params_data["ingest"]["min_size"] = 260  # beta is 240 wide: rejected, from the stored probe
    ingest = five.ingest()
    assert (ingest.computed, ingest.reused, len(ingest.rejected)) == (0, 3, 2)
    five.params_data["ingest"]["min_size"] = 64
    assert five.ingest().computed == 0


def test_transparent_images_depend_on_the_background(five):
    from PIL import Image

    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(five.raw("alpha") / "clear.png")
    assert counts(five) == ((1, 5), (1, 5))
    five.params_data["ingest"]["background"] = "black"
    assert counts(five) == ((0, 6), (1, 5))  # only the transparent image is redone


def test_parallel_workers_give_the_same_result(five):
    serial = five.manifest("data/bucketed")
    shutil.rmtree(five.root / ".tuneline")
    five.params_data["ingest"]["workers"] = 2
    five.params_data["bucket"]["workers"] = 2
    assert counts(five) == ((5, 0), (5, 0))
    assert five.manifest("data/bucketed") == serial


def test_a_failed_rebuild_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with rebuilt_dir(out) as staging:
        (staging / "manifest.jsonl").write_text("old\n")
    with pytest.raises(RuntimeError):
        with rebuilt_dir(out) as staging:
            (staging / "manifest.jsonl").write_text("half")
            raise RuntimeError("killed")
    assert (out / "manifest.jsonl").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
