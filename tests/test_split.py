"""The held-out split (`datasets[].validation`, tuneline.core.split): decided by content id, stable
under incremental change, recorded by the latents stage at no recompute, never in a training batch."""

from __future__ import annotations

import hashlib
import json
import random
import shutil

import pytest

from conftest import save_photo
from test_latents import make_captioned, run, write_captioned
from tuneline.cli import main
from tuneline.core.split import ALL, TRAIN, VALIDATION, held_out, parse_validation, split_hash


def ids(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [hashlib.sha256(rng.randbytes(16)).hexdigest()[:24] for _ in range(count)]


# --- the rule --------------------------------------------------------------------------------

def test_the_hash_is_fixed_and_spread_over_the_unit_interval():
    values = [split_hash(item) for item in ids(4000)]
    assert all(0 <= v < 1 for v in values)
    assert abs(sum(v < 0.1 for v in values) / len(values) - 0.1) < 0.02  # about a tenth below 0.1
    assert split_hash("abc") == split_hash("abc") != split_hash("abd")
    # Pinned: a changed hash or salt would move every user's held-out images.
    assert round(split_hash("0123456789abcdef01234567"), 12) == round(_pinned(), 12)


def _pinned() -> float:
    digest = hashlib.sha256(b"tuneline validation split v1\0" + b"0123456789abcdef01234567").digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def test_a_fraction_never_moves_an_existing_item():
    base = ids(300)
    before = held_out(base, 0.2)
    assert 30 < len(before) < 90 and before == {i for i in base if split_hash(i) < 0.2}
    for new in ids(50, seed=1):  # one image added at a time, then removed
        grown = base + [new]
        after = held_out(grown, 0.2)
        assert after - {new} == before
        assert held_out(grown[:-1], 0.2) == before
    shuffled = base[:]
    random.Random(3).shuffle(shuffled)  # the order of the list decides nothing
    assert held_out(shuffled, 0.2) == before
    removed = base[:150]
    assert held_out(removed, 0.2) == before & set(removed)


def test_a_count_is_exact_and_moves_at_most_one_existing_item():
    items = ids(40)
    held = held_out(items, 5)
    assert len(held) == 5
    moved_once = 0
    for new in ids(60, seed=2):
        grown = held_out(items + [new], 5)
        assert len(grown) == 5
        moved = {i for i in items if (i in held) != (i in grown)}
        assert len(moved) <= 1  # the 5th leaves, only when the new one ranks among the 5
        assert bool(moved) == (new in grown)
        moved_once += bool(moved)
        items, held = items + [new], grown
    assert moved_once  # the documented move does happen
    for gone in sorted(held):  # removing a held-out item moves the next one in, nothing else
        rest = [i for i in items if i != gone]
        after = held_out(rest, 5)
        assert len(after) == 5 and len(after - held) == 1
    assert held_out(items[:3], 5) == set(items[:3])  # fewer images than the count: all held out


def test_all_and_none():
    items = ids(7)
    assert held_out(items, ALL) == set(items) and held_out(items, None) == set()


@pytest.mark.parametrize("value, normal", [(None, None), (0, None), (0.0, None), (0.25, 0.25), (3, 3),
                                           ("all", ALL), ("ALL", ALL), ("1e-1", 0.1), ("2", 2)])
def test_settings_in_their_normal_form(value, normal):
    assert parse_validation(value) == normal and type(parse_validation(value)) is type(normal)


@pytest.mark.parametrize("value, says", [(1.0, "write 1 for one image or 'all'"), (2.0, "write 2"), (-1, "negative"),
                                         (True, "got true"), ("half", "allowed"), (1.5, "between 0 and 1"),
                                         (-0.1, "fraction")])
def test_bad_settings_are_refused_by_check_naming_the_key_and_the_allowed_values(tmp_path, capsys, value, says):
    (tmp_path / "params.yaml").write_text(json.dumps({"datasets": [{"name": "faces", "path": "x", "validation": value},
                                                                   {"name": "rest", "path": "y"}]}))
    assert main(["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path), "check", "--no-memory"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "datasets[faces].validation" in out and says in out
    assert "a fraction between 0 and 1 exclusive" in out and "'all'" in out and "integer count" in out


def test_check_refuses_a_run_where_every_data_set_is_validation_only(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(json.dumps({"datasets": [{"name": "a", "path": "x", "validation": "all"}]}))
    assert main(["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path), "check", "--no-memory"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "datasets[a].validation" in out and "nothing to train on" in out


# --- the stages ------------------------------------------------------------------------------

def latent_data(project, params):
    from tuneline.train.data import DatasetWeights, LatentData

    weights = {d.folder: DatasetWeights(d.repeats, d.loss_weight) for d in params.datasets}
    return LatentData(project.root / "data/latents", params.train, weights, params.bucket.batch_size_for)


def splits(project) -> dict[str, str]:
    return {r["id"]: r["split"] for r in project.manifest("data/latents")}


def with_validation(project, alpha=None, beta=None):
    for dataset, value in zip(project.params_data["datasets"], (alpha, beta)):
        dataset["validation"] = value
    return project.params()


def refresh(project):
    project.ingest()
    project.bucket()
    write_captioned(project)


@pytest.fixture
def captioned(project):
    """alpha: 3 landscape images, beta: 1 portrait (tiny SDXL), through caption."""
    return make_captioned(project)


def test_changing_the_split_recomputes_nothing_and_is_recorded(captioned, capsys):
    from tuneline.core.fsutil import digest_json

    first = run(captioned, with_validation(captioned))
    assert first.computed == 4 and first.extra["validation_items"] == 0
    assert set(splits(captioned).values()) == {TRAIN}
    data = latent_data(captioned, captioned.params())
    assert data.validation == [] and len(data.items) == 4
    # No split: the digest runs had before the split existed (they keep their run key).
    today = digest_json([[i.record.get("latent_key"), i.record.get("caption"), i.repeats, i.loss_weight]
                         for i in data.items])
    assert data.digest() == today

    params = with_validation(captioned, alpha=1, beta=ALL)
    second = run(captioned, params)
    assert (second.computed, second.reused) == (0, 4)  # no latent recomputed
    assert second.extra["text_embeddings_computed"] == 0 and not second.extra["vae_loaded"]
    assert not second.extra["text_encoders_loaded"]
    records = captioned.manifest("data/latents")
    alpha = [r["id"] for r in records if r["dataset"] == "alpha"]
    expected_alpha = held_out(alpha, 1)
    assert {r["id"]: r["split"] for r in records} == {
        **{i: VALIDATION if i in expected_alpha else TRAIN for i in alpha},
        **{r["id"]: VALIDATION for r in records if r["dataset"] == "beta"}}
    summary = json.loads((captioned.root / "data/latents/latents.json").read_text())
    assert summary["split"]["alpha"]["train"] == 2 and summary["split"]["alpha"]["validation"] == 1
    assert summary["split"]["beta"] == {**summary["split"]["beta"], "train": 0, "validation": 1,
                                        "validation_setting": ALL}
    stage_report = json.loads((captioned.root / "reports/latents.json").read_text())
    assert (stage_report["train_items"], stage_report["validation_items"], stage_report["computed"]) == (2, 2, 0)

    split_data = latent_data(captioned, params)
    assert {i.record["id"] for i in split_data.items} == set(alpha) - expected_alpha
    assert {i.record["id"] for i in split_data.validation} == {r["id"] for r in records} - {
        i.record["id"] for i in split_data.items}
    assert [i.index for i in split_data.validation] == list(range(2))
    assert split_data.digest() != today
    # Another split of the same images is another data identity.
    run(captioned, with_validation(captioned, alpha=2))
    other = latent_data(captioned, captioned.params())
    assert len(other.items) == 2 and other.digest() not in (today, split_data.digest())

    # `tuneline check` prints the split with the counts over the latest output and the rule.
    capsys.readouterr()
    assert main(["--params", str(captioned.root / "params.yaml"), "--root", str(captioned.root), "check",
                 "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "'alpha': train 1, validation 2; count 2" in out and "'beta': train 1, validation 0; no split" in out
    assert "a fraction is the strictly stable form" in out


def test_no_held_out_item_is_ever_in_a_training_batch(captioned):
    import torch

    from tuneline.train.sampler import BucketBatchSampler

    params = with_validation(captioned, alpha=1, beta=ALL)
    run(captioned, params)
    data = latent_data(captioned, params)
    held = {item.record["id"] for item in data.validation}
    trained = {item.record["id"] for item in data.items}
    assert len(held) == 2 and len(trained) == 2 and not held & trained
    assert all(item.record["dataset"] == "alpha" for item in data.items)  # beta is validation-only
    sampler = BucketBatchSampler(data.sample_refs(), data.batch_size_for, seed=5)
    for epoch in range(3):
        seen = set()
        for indices in sampler.all_batches(epoch):
            batch = data.batch(indices, torch.Generator().manual_seed(epoch), random.Random(epoch), "cpu")
            assert not set(batch["ids"]) & held
            seen.update(batch["ids"])
        assert seen == trained  # every training item, once an epoch at least, and nothing else


def test_adding_or_renaming_an_image_moves_no_existing_split(captioned):
    params = with_validation(captioned, alpha=0.5, beta=0.5)
    run(captioned, params)
    before = splits(captioned)
    for i in range(3):  # three more images of alpha, one at a time
        save_photo(captioned.raw("alpha") / f"new{i}.jpg", (200, 120 + 8 * i), 20 + i, quality=92)
        refresh(captioned)
        report = run(captioned, params)
        assert report.computed == 1
        after = splits(captioned)
        assert {i: after[i] for i in before} == before
        before = after
    shutil.move(captioned.raw("alpha") / "a0.jpg", captioned.raw("alpha") / "renamed.jpg")
    refresh(captioned)
    assert run(captioned, params).computed == 0
    assert splits(captioned) == before
    records = captioned.manifest("data/latents")
    assert {r["id"]: r["split"] for r in records} == {
        r["id"]: VALIDATION if split_hash(r["id"]) < 0.5 else TRAIN for r in records}

    # A count: adding one image moves at most one existing item.
    count = with_validation(captioned, alpha=2)
    run(captioned, count)
    before = splits(captioned)
    save_photo(captioned.raw("alpha") / "one_more.jpg", (216, 120), 31, quality=92)
    refresh(captioned)
    run(captioned, count)
    after = splits(captioned)
    assert sum(after[i] != before[i] for i in before) <= 1
    assert sum(1 for r in captioned.manifest("data/latents") if r["dataset"] == "alpha"
               and r["split"] == VALIDATION) == 2


def test_a_manifest_without_the_field_trains_on_everything(captioned):
    """Manifests written before the split existed: every record trains, the digest unchanged."""
    from tuneline.core.manifest import read_jsonl, write_jsonl

    run(captioned)
    path = captioned.root / "data/latents/manifest.jsonl"
    records = read_jsonl(path)
    digest = latent_data(captioned, captioned.params()).digest()
    write_jsonl(path, [{k: v for k, v in r.items() if k != "split"} for r in records])
    old = latent_data(captioned, captioned.params())
    assert len(old.items) == 4 and old.validation == [] and old.digest() == digest
