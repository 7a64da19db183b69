"""Scale-out: `caption`/`latents --shard I/N` fill the shared item store, the unsharded run assembles;
the Prefect flow with shards=2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from conftest import item_tensors, save_photo
from tuneline.core.manifest import read_jsonl
from tuneline.core.store import ItemStore
from test_flows import demo_project, prefect_env, run_report  # noqa: F401  (prefect_env: ephemeral Prefect, autouse)

LATENTS = {"batch_size": 2, "dtype": "fp32", "device": "cpu", "flip": True, "text_embeddings": True, "workers": 0}
CAPTION = {"model": "tiny-florence2", "mode": "fill", "batch_size": 4, "num_beams": 1, "max_new_tokens": 6}


def test_shard_option_and_key_partition():
    from tuneline.cli import parse_shard
    from tuneline.core.store import in_shard

    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shard(bad)
    keys = [f"{n:08x}" + "0" * 56 for n in range(0, 2**32, 2**32 // 97)]
    owners = [[i for i in range(3) if in_shard(key, (i, 3))] for key in keys]
    assert all(len(owner) == 1 for owner in owners)  # every key in exactly one shard
    assert {owner[0] for owner in owners} == {0, 1, 2}
    assert all(in_shard(key, None) for key in keys)


def stored(root: Path, stage: str, pattern: str = "*.*") -> set[str]:
    return {p.name for p in (root / ".tuneline/store" / stage).glob(f"*/{pattern}")}


def test_shards_fill_the_store_and_the_unsharded_run_assembles(project, capsys):
    import torch
    from tuneline.stages.caption.stage import run as run_caption
    from tuneline.cli import main
    from tuneline.stages.latents.stage import run as run_latents

    for index in range(4):
        save_photo(project.raw("alpha") / f"a{index}.jpg", (200 + 8 * index, 120), index, quality=92)
    for index in range(2):
        save_photo(project.raw("beta") / f"b{index}.png", (120, 200), 10 + index)
    project.params_data.update(caption=dict(CAPTION), latents=dict(LATENTS), tracking={"enabled": False})
    params = project.params()
    project.ingest(params)
    project.bucket(params)
    root = project.root
    items = len(project.manifest("data/bucketed"))
    assert items == 6

    # caption: the two shards as `tuneline caption --shard i/2` (in-process), counted in the store.
    counts = []
    for i in range(2):
        before = stored(root, "caption")
        assert main(["--root", str(root), "--params", str(root / "params.yaml"), "caption", "--shard", f"{i}/2"]) == 0
        counts.append(len(stored(root, "caption") - before))
        assert f"caption shard {i}/2" in capsys.readouterr().out
        assert not (root / "data/captioned").exists() and not (root / "metrics/caption.json").exists()
    assert sum(counts) == items and 0 < counts[0] < items, counts
    assembled = run_caption(params, root, root / "data/bucketed", root / "data/captioned", root / "metrics")
    assert (assembled.computed, assembled.extra["model_captions_reused"]) == (0, items)

    # latents: the two shards as functions.
    shards = [run_latents(params, root, root / "data/captioned", root / "data/latents", shard=(i, 2)) for i in range(2)]
    assert sum(r.computed for r in shards) == items and 0 < shards[0].computed < items
    assert not (root / "data/latents").exists() and not (root / "metrics/latents.json").exists()
    assembled = run_latents(params, root, root / "data/captioned", root / "data/latents", root / "metrics")
    assert (assembled.computed, assembled.extra["vae_loaded"], assembled.extra["text_encoders_loaded"]) == (0, False, False)
    assert json.loads((root / "reports/latents.json").read_text())["computed"] == 0

    # The same project run unsharded, cold, in another store: the same captions and tensors.
    cold = project.params(store_dir=".tuneline/cold")
    caption_cold = run_caption(cold, root, root / "data/bucketed", root / "cold/captioned")
    latents_cold = run_latents(cold, root, root / "cold/captioned", root / "cold/latents")
    assert caption_cold.computed == items and latents_cold.computed == items
    assert sum(r.extra["text_embeddings_computed"] for r in shards) == latents_cold.extra["text_embeddings_computed"]
    sharded = {r["id"]: r for r in project.manifest("data/latents")}
    unsharded = {r["id"]: r for r in project.manifest("cold/latents")}
    assert sharded.keys() == unsharded.keys() and len(sharded) == items
    for item_id, record in sharded.items():
        other = unsharded[item_id]
        assert (record["caption"], record["latent_key"], record["text_key"]) == (
            other["caption"], other["latent_key"], other["text_key"])
        for name in ("latents", "text_embeddings"):
            ours, theirs = item_tensors(root / "data/latents", record, name), item_tensors(root / "cold/latents", other, name)
            assert ours.keys() == theirs.keys()
            # Shards batch other images together, and a CPU conv's last bits depend on the batch (~1e-6).
            assert all(torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-5) for k in ours), (item_id, name)


@pytest.mark.slow
def test_flow_with_two_shards(tmp_path):
    import yaml

    from tuneline.orchestration.flow import pipeline

    root = demo_project(tmp_path / "project", ("scan", "ingest", "bucket", "caption", "latents"))
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["tracking"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    summary = pipeline(root=str(root), shards=2)["stages"]
    items = len((root / "data/bucketed/manifest.jsonl").read_text().splitlines())
    for stage in ("caption", "latents"):
        assert [s["cached"] for s in summary[stage]["shards"]] == [False, False]
        assert not summary[stage]["cached"]
        assert run_report(root, stage)["computed"] == 0, stage  # the shards did all of it
    # The assembling run packed what the shards stored (no loose file left) and finds every item there.
    store = ItemStore(root / ".tuneline/store", "latents")
    assert not list(store.root.glob("*/*.safetensors"))
    assert sum(store.has(r["latent_key"], ".safetensors") for r in read_jsonl(root / "data/latents/manifest.jsonl")) == items
    assert len((root / "data/latents/manifest.jsonl").read_text().splitlines()) == items

    again = pipeline(root=str(root), shards=2)["stages"]  # unchanged: every task, shards too, is a hit
    assert all(result["cached"] for stage, result in again.items() if stage != "scan")  # scan runs always
    assert all(s["cached"] for stage in ("caption", "latents") for s in again[stage]["shards"])
