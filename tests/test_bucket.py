"""Bucket geometry, crops, small buckets, and the images the stage writes."""

import json
import numpy as np
import pytest
from PIL import Image

from conftest import item_image, save_photo
from tuneline.stages.bucket.aspect import assign_bucket, generate_buckets, merge_small_buckets, nearest_bucket, plan_crop
from tuneline.stages.bucket.config import BucketSettings


def test_generated_buckets_follow_sdxl_rules():
    buckets = generate_buckets(BucketSettings())
    assert (1024, 1024) in buckets and (1152, 896) in buckets and (896, 1152) in buckets
    assert (1344, 768) in buckets and (768, 1344) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 1024 * 1024
        assert 0.5 <= width / height <= 2.0
        assert width * height > 1024 * 1024 * 0.85  # as close to the area as the grid allows
    assert len(buckets) == len(set(buckets))


def test_explicit_resolutions_replace_generation():
    settings = BucketSettings(resolutions=["1024x1024", "1216x832"])
    assert generate_buckets(settings) == [(1024, 1024), (1216, 832)]


def test_nearest_bucket_by_aspect_in_log_space():
    buckets = generate_buckets(BucketSettings())
    assert nearest_bucket((1920, 1080), buckets) == (1344, 768)  # 16:9 -> 1.75
    assert nearest_bucket((1080, 1920), buckets) == (768, 1344)
    assert nearest_bucket((500, 500), buckets) == (1024, 1024)
    assert nearest_bucket((5000, 500), buckets) == max(buckets, key=lambda b: b[0] / b[1])


def test_no_upscale_gives_small_images_their_own_bucket():
    settings = BucketSettings(no_upscale=True)
    buckets = generate_buckets(settings)
    assert assign_bucket((700, 500), settings, buckets) == (640, 448)
    assert assign_bucket((3000, 2000), settings, buckets) == nearest_bucket((3000, 2000), buckets)


def test_crop_plan_covers_the_bucket_and_records_top_left():
    plan = plan_crop((1920, 1080), (1344, 768), "center", 0, "x")
    assert plan.resized == (1365, 768)
    assert (plan.left, plan.top) == (10, 0)
    assert plan.box == (10, 0, 1354, 768)
    randoms = {plan_crop((1000, 1000), (1152, 896), "random", 0, f"item{i}").top for i in range(20)}
    assert len(randoms) > 5 and all(0 <= t <= 1152 - 896 for t in randoms)
    # Each item's random crop depends only on seed and item.
    assert plan_crop((1000, 1000), (1152, 896), "random", 0, "a") == plan_crop((1000, 1000), (1152, 896), "random", 0, "a")
    assert plan_crop((1000, 1000), (1152, 896), "random", 1, "a") != plan_crop((1000, 1000), (1152, 896), "random", 0, "a")


def test_merge_small_buckets_into_nearest():
    counts = {(1024, 1024): 10, (1152, 896): 1, (1344, 768): 2, (768, 1344): 4}
    moved = merge_small_buckets(counts, lambda b: 4)
    assert moved == {(1152, 896): (1024, 1024), (1344, 768): (1024, 1024)}
    assert merge_small_buckets({(1024, 1024): 1}, lambda b: 4) == {}  # nowhere to go


def _landscape_and_portrait(project):
    save_photo(project.raw("alpha") / "wide.jpg", (600, 300), 1, quality=92)
    save_photo(project.raw("alpha") / "wide2.jpg", (640, 320), 2, quality=92)
    save_photo(project.raw("beta") / "tall.png", (300, 600), 3)


def test_stage_writes_bucketed_images_with_sdxl_metadata(project):
    _landscape_and_portrait(project)
    project.ingest()
    report = project.bucket()
    records = {r["source"].split("/")[-1]: r for r in project.manifest("data/bucketed")}
    wide = records["wide.jpg"]
    assert wide["bucket"] == [160, 96] and wide["original_size"] == [600, 300]
    assert wide["resized_size"] == [192, 96] and wide["crop_top_left"] == [0, 16]
    image = item_image(project.root / "data/bucketed", wide)
    assert image.format == "PNG" and image.size == (160, 96)
    assert records["tall.png"]["bucket"] == [96, 160]
    assert wide["caption"] is None and wide["id"] and wide["key"]
    assert report.computed == 3
    summary = json.loads((project.root / "data/bucketed/buckets.json").read_text())
    assert {b["resolution"]: b["count"] for b in summary["buckets"]} == {"96x160": 1, "160x96": 2}
    # metrics/ (tracked by DVC): what the inputs decide; reports/: what this run did.
    assert json.loads((project.root / "metrics/bucket.json").read_text()) == {"items": 3, "rejected": 0}
    run_report = json.loads((project.root / "reports/bucket.json").read_text())
    assert (run_report["items"], run_report["computed"], run_report["reused"], run_report["buckets"]) == (3, 3, 0, 2)
    assert run_report["seconds"] >= 0


def test_crop_takes_the_right_pixels(project):
    # Left third red, right two thirds blue; a square center crop of a 3:1 image is all blue-ish.
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, :100] = (255, 0, 0)
    pixels[:, 100:] = (0, 0, 255)
    Image.fromarray(pixels).save(project.raw("alpha") / "flag.png")
    project.ingest()
    project.bucket(project.params(bucket={"resolutions": ["96x96"], "divisible_by": 32}))
    [record] = project.manifest("data/bucketed")
    out = np.asarray(item_image(project.root / "data/bucketed", record)).astype(int)
    assert record["crop_top_left"] == [0, 96]
    assert out[:, 10:].mean(axis=(0, 1))[2] > 240  # all blue after the crop
    assert out[:, :, 0].max() < 60


def test_small_buckets_drop_or_merge(project):
    _landscape_and_portrait(project)
    project.ingest()
    report = project.bucket(project.params(bucket={"batch_size": 2, "small_buckets": "drop"}))
    assert sorted(r["source"].split("/")[-1] for r in project.manifest("data/bucketed")) == ["wide.jpg", "wide2.jpg"]
    [dropped] = project.rejected("data/bucketed")
    assert dropped["reason"].startswith("small bucket: 96x160 holds 1 image(s), fewer than its batch size 2")
    assert report.rejection_counts()["small bucket"] == 1

    report = project.bucket(project.params(bucket={"batch_size": 2, "small_buckets": "merge"}))
    buckets = {r["source"].split("/")[-1]: r["bucket"] for r in project.manifest("data/bucketed")}
    assert buckets["tall.png"] == buckets["wide.jpg"]  # merged into the only other bucket
    assert buckets["tall.png"] == [160, 96]
    assert report.extra["merged_buckets"] == {"96x160": "160x96"}
    assert any("merged into" in w for w in report.warnings)


def test_per_bucket_batch_sizes_decide_what_is_small(project):
    _landscape_and_portrait(project)
    project.ingest()
    project.bucket(project.params(bucket={"batch_size": 1, "batch_sizes": {"160x96": 3}, "small_buckets": "drop"}))
    assert [r["bucket"] for r in project.manifest("data/bucketed")] == [[96, 160]]


def test_data_set_overrides_apply_to_their_data_set_only(project):
    _landscape_and_portrait(project)
    project.ingest()
    data = project.params_data
    data["datasets"][1]["bucket"] = {"resolutions": ["64x128"]}
    project.bucket(project.params())
    buckets = {r["dataset"]: r["bucket"] for r in project.manifest("data/bucketed")}
    assert buckets == {"alpha": [160, 96], "beta": [64, 128]}


def test_draft_decoding_matches_full_decoding(project):
    save_photo(project.raw("alpha") / "big.jpg", (1600, 1200), 4, quality=95)
    project.ingest()
    project.bucket(project.params(bucket={"draft": True}))
    [drafted] = project.manifest("data/bucketed")
    fast = np.asarray(item_image(project.root / "data/bucketed", drafted)).astype(int)
    project.bucket(project.params(bucket={"draft": False}))
    [full] = project.manifest("data/bucketed")
    slow = np.asarray(item_image(project.root / "data/bucketed", full)).astype(int)
    assert drafted["key"] != full["key"]
    assert fast.shape == slow.shape
    assert np.abs(fast - slow).mean() < 1.5


def test_png_writer_is_lossless_and_standard(tmp_path):
    from tuneline.core.png import encode_png_rgb, write_png_rgb

    pixels = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    write_png_rgb(Image.fromarray(pixels), tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as decoded:
        assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "RGB", (53, 37))
        assert np.array_equal(np.asarray(decoded), pixels)
    with pytest.raises(ValueError, match="RGB"):
        encode_png_rgb(Image.new("L", (4, 4)))


def test_turning_draft_off_recomputes_only_images_it_reduced(project):
    save_photo(project.raw("alpha") / "big.jpg", (1600, 1200), 4, quality=95)  # >= 2x the bucket: drafted
    save_photo(project.raw("alpha") / "small.jpg", (200, 150), 5, quality=95)  # < 2x: decoded in full anyway
    save_photo(project.raw("alpha") / "tiny.jpg", (96, 72), 7, quality=95)  # smaller than its bucket: upscaled
    save_photo(project.raw("beta") / "lossless.png", (1600, 1200), 6)  # not a JPEG: never drafted
    project.ingest()
    project.bucket(project.params(bucket={"draft": True}))
    report = project.bucket(project.params(bucket={"draft": False}))
    assert (report.computed, report.reused) == (1, 3)


def test_atomic_writes_get_the_default_file_mode(tmp_path):
    import os

    from tuneline.core.fsutil import atomic_write_text

    atomic_write_text(tmp_path / "x.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask
