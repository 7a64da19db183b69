"""FSDP2 on two CPU processes over gloo: a full fine-tune checkpoints, resumes from that checkpoint and ends with
the weights, shards and final diffusers folders of a straight two-process run; the folders hold the gathered
weights of the last checkpoint (live and EMA).

accelerate 1.15 switches to FSDP only on accelerator backends (its AcceleratorState leaves MULTI_CPU as it is
and ignores the plugin: the model is wrapped in DistributedDataParallel). torch's fully_shard runs on gloo, so
the launched script sets accelerate's distributed type to FSDP after the Accelerator starts: what runs is then
accelerate's own FSDP2 prepare, save_state and load_state, and torch.distributed.checkpoint, on CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from resume_checks import assert_same_tensors, checkpoint_at
from test_train import REPO, family_project
from test_train_zimage import zimage_project  # noqa: F401  (a fixture: the Z-Image latents project)

FSDP_ON_CPU = """
import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from tuneline.cli import main


class CpuFsdpAccelerator(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                state_dict_type="SHARDED_STATE_DICT", reshard_after_forward=True)
        super().__init__(*args, fsdp_plugin=plugin, **kwargs)
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.state.fsdp_plugin = plugin


accelerate.Accelerator = CpuFsdpAccelerator
sys.exit(main(["train"]))
"""


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(root: Path, script: Path) -> str:
    """The two processes torchrun would start (its env:// variables), started directly: torchrun's own process
    would import torch once more before them, seconds on a shared core."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    logs = [root / f"rank{rank}.log" for rank in range(2)]
    processes = [subprocess.Popen([sys.executable, str(script)], cwd=root, stdout=log.open("w"),
                                  stderr=subprocess.STDOUT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                 for rank, log in enumerate(logs)]
    try:
        codes = [process.wait(timeout=300) for process in processes]
    finally:
        for process in processes:  # one that failed leaves the other waiting in a collective
            if process.poll() is None:
                process.kill()
                process.wait()
    output = "\n".join(log.read_text("utf-8", errors="replace") for log in logs)
    assert codes == [0, 0], output[-6000:]
    return output


def sharded_state(folder: Path, scratch: Path) -> dict:
    """A torch.distributed.checkpoint folder as one flat dict of its full tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, scratch)

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + str(key): value})
        return out

    return flat(torch.load(scratch, weights_only=False))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl"])  # the sharding path is the trainer core's; the blocks: test_fsdp.py
def test_fsdp_two_processes_resume_matches_a_straight_run(request, family, tmp_path):
    project = family_project(request, family)
    script = tmp_path / "fsdp_on_cpu.py"
    script.write_text(FSDP_ON_CPU, "utf-8")
    roots = {}
    for run in ("straight", "resumed"):
        root = roots[run] = tmp_path / run
        shutil.copytree(project.root / "data/latents", root / "data/latents")
        # Two steps, a checkpoint after each: the resumed run's step 2 needs the Adam moments, the EMA shadow and
        # count (step 2 is its first averaging step), the RNG streams and the schedule of step 1's checkpoint.
        train = {"seed": 5, "num_steps": 2, "mode": "full", "optimizer": {"name": "adamw"},
                 "checkpoint": {"every_steps": 1}, "ema": {"enabled": True, "decay": 0.9}}
        # No MLflow: its import and database set-up cost each launch seconds and nothing here reads it.
        params = {**project.params_data, "train": train, "tracking": {"enabled": False}}
        (root / "params.yaml").write_text(yaml.safe_dump(params), "utf-8")
    output = launch(roots["straight"], script)
    assert "FSDP2 over 2 processes" in output, output
    # The resumed run starts from the straight run's step-1 checkpoint (what a stop at step 1 saves).
    first = checkpoint_at(roots["straight"] / "checkpoints/train", 1)
    run_dir = roots["resumed"] / "checkpoints/train" / first.parent.name
    shutil.copytree(first, run_dir / first.name)
    (run_dir / "latest").write_text(first.name + "\n", "utf-8")
    output = launch(roots["resumed"], script)
    assert "resumed from" in output and "at step 1" in output, output
    straight, resumed = (checkpoint_at(roots[r] / "checkpoints/train", 2) for r in ("straight", "resumed"))
    layout = sorted(p.relative_to(straight).as_posix() for p in straight.rglob("*") if p.is_file())
    assert {"trained.safetensors", "training.pt", "rng_rank0.pt", "rng_rank1.pt", "fsdp/pytorch_model_fsdp_0/.metadata",
            "fsdp/optimizer_0/.metadata", "ema/.metadata"} <= set(layout), layout
    assert [p for p in layout if p.startswith("ema/__")] == ["ema/__0_0.distcp", "ema/__1_0.distcp"]
    weights = load_file(straight / "trained.safetensors")
    assert_same_tensors(weights, load_file(resumed / "trained.safetensors"), "straight against resumed weights")
    step_1 = load_file(first / "trained.safetensors")
    assert not torch.equal(weights["unet.conv_in.weight"], step_1["unet.conv_in.weight"])  # step 2 trained
    # The optimizer and EMA shards written at step 2 agree too.
    shards = {}
    for part in ("fsdp/optimizer_0", "ema"):  # the model's: trained.safetensors, gathered from them
        a, b = (sharded_state(folder / part, tmp_path / f"{run}.pt")
                for folder, run in ((straight, "a"), (resumed, "b")))
        assert a.keys() == b.keys() and len(a) > 100, part
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], (part, key)
        shards[part] = a
    # The final diffusers folders: the same bytes after a resume, and they hold the gathered weights of step 2.
    outputs = {run: roots[run] / "models/train" for run in roots}
    assert folder_bytes(outputs["straight"] / "pipeline") == folder_bytes(outputs["resumed"] / "pipeline")
    assert folder_bytes(outputs["straight"] / "ema") == folder_bytes(outputs["resumed"] / "ema")
    unet = load_file(outputs["straight"] / "pipeline/unet/diffusion_pytorch_model.safetensors")
    assert_same_tensors(unet, {k.removeprefix("unet."): v for k, v in weights.items()}, "output against checkpoint")
    ema = load_file(outputs["straight"] / "ema/pipeline/unet/diffusion_pytorch_model.safetensors")
    shadow = {k.removeprefix("shadow.unet."): v for k, v in shards["ema"].items()}
    assert_same_tensors(ema, shadow, "EMA output against the EMA shards")
    assert any(not torch.equal(ema[key], unet[key]) for key in unet)
