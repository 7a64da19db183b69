"""The shard tasks on Dask (prefect-dask): the runner choice, the shared-store probe, and caption +
latents on a LocalCluster of 2 worker processes: byte-identical to a single-process run, a worker
killed mid-shard leaves whole items only and a rerun finishes its shard."""

from __future__ import annotations

import hashlib
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from test_flows import demo_project, prefect_env, run_report  # noqa: F401  (prefect_env: ephemeral Prefect, autouse)

STAGES = ("scan", "ingest", "bucket", "caption", "latents")


def test_the_runner_choice_is_checked_and_shown_in_the_form():
    from prefect.utilities.callables import parameter_schema

    from tuneline.core.params import ParamsError
    from tuneline.orchestration.cluster import check_runner
    from tuneline.orchestration.flow import pipeline

    for runner, address in (("threads", None), ("dask", None), ("dask", "tcp://10.0.0.5:8786"),
                            ("dask", "tls://head.example:8786"), ("dask", "127.0.0.1:8786")):
        check_runner(runner, address)
    for runner, address, said in (
            ("spark", None, "task_runner: 'spark' is not one of 'threads', 'dask'"),
            ("threads", "tcp://head:8786", "dask_address: 'tcp://head:8786' is set but task_runner is 'threads'"),
            ("dask", "head", "dask_address: 'head' is not a Dask scheduler address"),
            ("dask", "http://head:8786", "dask_address: 'http://head:8786' is not a Dask scheduler address"),
            ("dask", "tcp://head:99999", "dask_address: 'tcp://head:99999' is not a Dask scheduler address")):
        with pytest.raises(ParamsError) as refused:
            check_runner(runner, address)
        assert str(refused.value).startswith(said), str(refused.value)

    form = parameter_schema(pipeline).model_dump()
    properties = form["properties"]
    assert properties["task_runner"]["enum"] == ["threads", "dask"] and properties["task_runner"]["default"] == "threads"
    assert {"type": "string"} in properties["dask_address"]["anyOf"] and properties["dask_address"]["default"] is None


@dataclass
class FakeWorker:
    address: str
    name: str


class Machines:
    """Dask's `client.run` over workers on different machines: each sees `mounts[address]` where the
    flow's machine has `shared` (a worker whose folder is not the shared one has a disk of its own)."""

    def __init__(self, shared: Path, mounts: dict[str, Path]) -> None:
        self.shared, self.mounts = str(shared), mounts

    def run(self, function: Callable[..., Any], *args: Any) -> dict[str, Any]:
        answers = {}
        for index, (address, mount) in enumerate(self.mounts.items()):
            seen = [a.replace(self.shared, str(mount)) if isinstance(a, str) else a for a in args]
            kwargs = {"dask_worker": FakeWorker(address, str(index))} if function.__name__ == "write_probe" else {}
            answers[address] = function(*seen, **kwargs)
        return answers


def test_the_store_probe_refuses_a_worker_that_does_not_see_the_store(tmp_path):
    from tuneline.orchestration.cluster import PROBE_DIR, ClusterError, check_shared_store

    project = tmp_path / "project"
    (project / ".tuneline/params").mkdir(parents=True)
    params = project / ".tuneline/params/params.yaml"
    params.write_text("{}\n")
    store = project / ".tuneline/store"

    views = check_shared_store(Machines(project, {"tcp://10.0.0.1:4001": project, "tcp://10.0.0.2:4001": project}),
                               store, params)
    assert [(v.name, v.address, v.error, v.missing) for v in views] == [
        ("0", "tcp://10.0.0.1:4001", None, ()), ("1", "tcp://10.0.0.2:4001", None, ())]
    assert list((store / PROBE_DIR).iterdir()) == []  # the probe cleans up after itself

    # Worker 1's machine has the project's path on its own disk, with a copy of the params.
    elsewhere = tmp_path / "worker1-disk"
    (elsewhere / ".tuneline/params").mkdir(parents=True)
    (elsewhere / ".tuneline/params/params.yaml").write_text("{}\n")
    with pytest.raises(ClusterError) as refused:
        check_shared_store(Machines(project, {"tcp://10.0.0.1:4001": project, "tcp://10.0.0.2:4001": elsewhere}),
                           store, params)
    message = str(refused.value)
    assert message.startswith(f"the item store {store} is not shared by every Dask worker: ")
    probe = f"{store}/{PROBE_DIR}/"
    assert "worker 0 (tcp://10.0.0.1:4001 on " in message and "does not see the probe files of tcp://10.0.0.2:4001 in " + probe in message
    assert "worker 1 (tcp://10.0.0.2:4001 on " in message and "does not see the probe files of tcp://10.0.0.1:4001 in " + probe in message
    assert "this flow process" in message and "does not see the probe file of worker 1 (tcp://10.0.0.2:4001" in message
    assert "does not see the probe file of worker 0" not in message
    assert message.endswith("Put the project and its store (params store_dir) on a file system every worker "
                            "mounts at the same path.")

    # A worker without the project at all (nothing at that path): named with the file it cannot see.
    (elsewhere / ".tuneline/params/params.yaml").unlink()
    with pytest.raises(ClusterError, match=r"worker 1 \(tcp://10.0.0.2:4001 on [^)]+\) cannot see the project's file "
                                           + str(elsewhere / ".tuneline/params/params.yaml")):
        check_shared_store(Machines(project, {"tcp://10.0.0.1:4001": project, "tcp://10.0.0.2:4001": elsewhere}),
                           store, params)


# Loaded by every Python process started with this folder on PYTHONPATH (Dask workers, their shard
# processes). In a latents shard process it logs each item renamed into the store (TUNELINE_TEST_ITEMS:
# "<store>/latents <log file>"), and in the shard TUNELINE_TEST_KILL_WORKER names ("<shard> <K>"), right
# after its K-th item, SIGKILLs the Dask worker that runs it (its parent), then itself: a worker killed
# mid-shard, at a known point.
KILL_HOOK = '''
import os, signal, sys, threading

_items = os.environ.get("TUNELINE_TEST_ITEMS", "").split()
_argv = getattr(sys, "orig_argv", sys.argv)
if _items and "latents" in _argv and "--shard" in _argv:
    _shard = _argv[_argv.index("--shard") + 1]
    _kill = os.environ.get("TUNELINE_TEST_KILL_WORKER", "").split()
    _after = int(_kill[1]) if _kill and _kill[0] == _shard else 0
    _folder, _log = _items[0].rstrip("/") + "/", _items[1]
    _replace, _lock, _count = os.replace, threading.Lock(), [0]

    def _replace_then_kill(src, dst, *args, **kwargs):
        _replace(src, dst, *args, **kwargs)
        target = os.fspath(dst)
        if target.startswith(_folder) and target.endswith(".safetensors"):
            with _lock:
                _count[0] += 1
                with open(_log, "a") as log:
                    log.write(_shard + " " + os.path.basename(target) + "\\n")
                if _count[0] == _after:
                    os.kill(os.getppid(), signal.SIGKILL)
                    os.kill(os.getpid(), signal.SIGKILL)

    os.replace = _replace_then_kill
'''


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> digest), probe and temp files left out."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and ".probe" not in p.parts and ".tmp-" not in p.name}


def project_for(root: Path) -> Path:
    import yaml

    demo_project(root, STAGES)
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["tracking"]["enabled"] = False
    # One image per batch: a CPU conv's last bits depend on the batch, and shards batch other images together.
    data["caption"]["batch_size"] = 1
    data["latents"]["batch_size"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root


def dask_processes() -> list[str]:
    """Command lines of the worker processes (multiprocessing's spawn_main: Dask's nannies start their
    workers so) still alive under this test process; Prefect's temporary server and multiprocessing's
    resource tracker stay for the session."""
    import psutil

    alive = []
    for process in psutil.Process().children(recursive=True):
        try:
            line = " ".join(process.cmdline())
            if process.status() != psutil.STATUS_ZOMBIE and "spawn_main" in line:
                alive.append(line)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
def test_caption_and_latents_on_a_local_dask_cluster(tmp_path, monkeypatch):
    import dask
    import distributed  # noqa: F401  (loads its config defaults: dask.config.set below must not drop them on exit)

    from tuneline.core.store import ItemStore
    from tuneline.orchestration.flow import ShardLost, pipeline

    root = project_for(tmp_path / "project")
    store = root / ".tuneline/store"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(KILL_HOOK))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    stored_log = tmp_path / "stored.txt"
    monkeypatch.setenv("TUNELINE_TEST_ITEMS", f"{store}/latents {stored_log}")
    monkeypatch.setenv("TUNELINE_TEST_KILL_WORKER", "0/2 2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # two "GPUs": one worker each (CPU torch ignores the pin)
    # Dask would rerun a lost worker's task on another worker (allowed-failures: 3): 0 shows the loss.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), pytest.raises(ShardLost) as lost:
        pipeline(root=str(root), task_runner="dask")
    assert str(lost.value).startswith("latents shard 0/2 was lost with its Dask worker: ")
    assert "run the flow again to compute the rest of the shard" in str(lost.value)
    assert not dask_processes()  # the local cluster is gone with the flow run
    items = len((root / "data/bucketed/manifest.jsonl").read_text().splitlines())

    # Whole items only: the shard's first items (the 2nd's rename triggered the kill; a third may have
    # been renamed by a concurrent writer thread) and all of shard 1's, each a readable safetensors.
    from safetensors import safe_open

    latents = ItemStore(store, "latents")
    stored = sorted(latents.root.glob("*/*.safetensors"))
    for path in stored:
        with safe_open(str(path), "pt") as handle:
            assert list(handle.keys()), path
    from tuneline.core.store import in_shard

    by_shard = [sum(in_shard(p.stem, (i, 2)) for p in stored) for i in range(2)]
    assert by_shard[0] >= 2 and 0 < by_shard[1] and sum(by_shard) < items, by_shard
    assert sorted(stored_log.read_text().split()[1::2]) == sorted(p.name for p in stored)
    stored_log.unlink()

    monkeypatch.delenv("TUNELINE_TEST_KILL_WORKER")
    again = pipeline(root=str(root), task_runner="dask")
    assert sorted(w["gpu"] for w in again["dask"]["workers"]) == ["0", "1"] and again["dask"]["shards"] == 2
    stages = again["stages"]
    assert all(stages[s]["cached"] for s in ("ingest", "bucket", "caption")), stages
    # The latents outputs were never assembled, so both shard tasks run again (as with threads): the lost
    # shard stores exactly its missing items, the other finds all of its own stored.
    rerun = stored_log.read_text().split()
    assert rerun[0::2] == ["0/2"] * (items - sum(by_shard)), rerun
    assert not {name for name in rerun[1::2]} & {p.name for p in stored}
    assert run_report(root, "latents")["computed"] == 0  # the assembled stages reuse everything
    assert run_report(root, "caption")["computed"] == 0
    assert not dask_processes()

    # The same two stages in this one process, cold, into another store: the same bytes everywhere.
    from tuneline.config import load_params
    from tuneline.stages.caption.stage import run as run_caption
    from tuneline.stages.latents.stage import run as run_latents

    single = load_params(root / "params.yaml").model_copy(update={"store_dir": ".tuneline/single"})
    captioned = run_caption(single, root, root / "data/bucketed", root / "single/captioned")
    assert captioned.computed > 0 and captioned.computed + captioned.given == items  # the rest: sidecar captions
    assert run_latents(single, root, root / "single/captioned", root / "single/latents").computed == items
    stores = [(f".tuneline/store/{d.name}", f".tuneline/single/{d.name}") for d in (root / ".tuneline/single").iterdir()]
    assert {f".tuneline/store/{name}" for name in ("caption", "latents", "text_embeddings")} == {o for o, _ in stores}
    # Text embeddings are encoded TEXT_BATCH (32) captions at a time, and the shards split those batches
    # differently: their last bits differ (~1e-6, as in test_sharding); every other byte is the same.
    for ours, theirs in [("data/captioned", "single/captioned"), ("data/latents", "single/latents"), *stores]:
        ours_digests, theirs_digests = tree_digest(root / ours), tree_digest(root / theirs)
        assert ours_digests and ours_digests.keys() == theirs_digests.keys(), (ours, ours_digests.keys() ^ theirs_digests.keys())
        differ = [n for n in ours_digests if ours_digests[n] != theirs_digests[n]]
        text_store = ours.endswith("/text_embeddings")
        assert [n for n in differ if not (text_store or (ours == "data/latents" and n.endswith(".text.tar")))] == [], ours
    import torch

    from conftest import item_tensors
    from tuneline.core.manifest import read_jsonl

    sharded = {r["id"]: r for r in read_jsonl(root / "data/latents/manifest.jsonl")}
    alone = {r["id"]: r for r in read_jsonl(root / "single/latents/manifest.jsonl")}
    assert sharded == alone and len(sharded) == items
    for item_id, record in sharded.items():
        ours, theirs = (item_tensors(root / folder, record, "text_embeddings") for folder in ("data/latents", "single/latents"))
        assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-5) for k in ours)
