"""FSDP2 up to the multi-process run (that one is tests/test_fsdp_run.py): the shipped accelerate config, the
families' wrap-policy blocks, the refusals, the per-process memory estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_memory_published import estimate, params_data, root  # noqa: F401  (fixtures: the published shapes)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/accelerate/fsdp2.yaml"
# Where each family's denoiser classes live in diffusers.
DENOISERS = {"sdxl": "diffusers.models.unets.unet_2d_condition",
             "zimage": "diffusers.models.transformers.transformer_z_image"}


def test_the_shipped_config_is_an_fsdp2_full_shard_with_a_sharded_state_dict(monkeypatch):
    """accelerate launch turns the config into FSDP_* variables; the plugin built from them is what we ship."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser, prepare_multi_gpu_env
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    config = load_config_from_file(str(CONFIG))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    args = launch_command_parser().parse_args(["--config_file", str(CONFIG), "-m", "tuneline.cli", "train"])
    args, *_ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap is None  # the trainer fills the family's blocks
    assert plugin.cpu_ram_efficient_loading is False


@pytest.mark.parametrize("family", ["sdxl", "zimage"])
def test_the_family_blocks_are_diffusers_classes_of_its_denoiser(family):
    import importlib

    import torch

    from tuneline.models.family import FAMILIES

    blocks = FAMILIES[family].shard_blocks
    assert blocks
    module = importlib.import_module(DENOISERS[family])
    denoiser = getattr(module, {"sdxl": "UNet2DConditionModel", "zimage": "ZImageTransformer2DModel"}[family])
    source = importlib.import_module(denoiser.__module__)
    for name in blocks:
        # The class the wrap policy matches by name, reachable from the denoiser's module (diffusers' own import).
        block = getattr(source, name, None) or getattr(importlib.import_module("diffusers.models.attention"), name, None) \
            or getattr(importlib.import_module("diffusers.models.resnet"), name)
        assert issubclass(block, torch.nn.Module), name
    # The blocks are what diffusers itself keeps whole on a device (its _no_split_modules).
    assert set(blocks) <= set(denoiser._no_split_modules)


def test_fsdp_needs_one_trained_module_and_one_optimizer():
    from types import SimpleNamespace

    from tuneline.train.fsdp import FsdpRefused, set_wrap_blocks

    plugin = SimpleNamespace(transformer_cls_names_to_wrap=None)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    with pytest.raises(FsdpRefused, match=r"\['text_encoder', 'unet'\] with 1 optimizer"):
        set_wrap_blocks(accelerator, "sdxl", {"unet": None, "text_encoder": None}, 1)
    assert set_wrap_blocks(accelerator, "zimage", {"transformer": None}, 1) == ["ZImageTransformerBlock"]
    plugin.transformer_cls_names_to_wrap = ["MyBlock"]  # named in the accelerate config: kept
    assert set_wrap_blocks(accelerator, "sdxl", {"unet": None}, 1) == ["MyBlock"]
    with pytest.raises(FsdpRefused, match="names no blocks"):
        set_wrap_blocks(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
            transformer_cls_names_to_wrap=None))), "autoencoder_kl", {"vae": None}, 1)


def test_the_estimate_per_process_divides_what_fsdp_shards(estimate):  # noqa: F811
    full = estimate(params_data("sdxl", train={"mode": "full", "ema": {"enabled": True}}))
    assert full.trained > 5 * 2**30  # SDXL's UNet in fp32: 2.6B parameters
    peaks = {}
    for processes in (1, 2, 4):
        part = full.sharded(processes)
        for key in ("trained", "gradients", "optimizer", "ema"):
            assert getattr(part, key) == -(-getattr(full, key) // processes), (key, processes)
        assert part.weights == full.weights and part.activations == full.activations
        peaks[processes] = part.peak
    sharded = full.trained + full.gradients + full.optimizer + full.ema
    assert peaks[1] == full.peak
    assert peaks[1] - peaks[2] == sharded - 2 * -(-sharded // 2) + sharded // 2 or \
        abs((peaks[1] - peaks[2]) - sharded / 2) <= 4
    assert abs((peaks[1] - peaks[4]) - sharded * 3 / 4) <= 4


@pytest.mark.parametrize("family", ["sdxl", "zimage"])
def test_the_final_output_is_written_from_a_plain_copy_with_the_bytes_of_the_unsharded_module(family, tmp_path):
    """fully_shard swaps a module's class for an FSDP subclass (diffusers would name that class in config.json)
    and its parameters for DTensors: the final output is saved from a copy of the module's own class holding the
    gathered full weights, which diffusers writes byte for byte as the unsharded module."""
    import importlib

    import torch
    from torch.distributed.fsdp import FSDPModule

    from tuneline.tiny.cache import resolve_tiny
    from tuneline.train.fsdp import plain_copy

    name = {"sdxl": "UNet2DConditionModel", "zimage": "ZImageTransformer2DModel"}[family]
    cls = getattr(importlib.import_module(DENOISERS[family]), name)
    subfolder = {"sdxl": "unet", "zimage": "transformer"}[family]
    module = cls.from_pretrained(resolve_tiny(f"tiny-{family}"), subfolder=subfolder)
    with torch.no_grad():  # trained weights, not the base's
        for parameter in module.parameters():
            parameter.mul_(1.5)
    module.save_pretrained(tmp_path / "unsharded")
    state = {key: value.clone() for key, value in module.state_dict().items()}
    module.__class__ = type(f"FSDP{name}", (FSDPModule, cls), {})  # what fully_shard does to the class
    copy = plain_copy(module, state)
    assert type(copy) is cls and not any(p.is_meta for p in copy.parameters())
    assert all(p.data_ptr() == state[key].data_ptr() for key, p in copy.named_parameters())  # no second copy
    copy.save_pretrained(tmp_path / "copy")
    files = sorted(p.name for p in (tmp_path / "unsharded").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "copy").iterdir()) and "config.json" in files
    for file in files:
        assert (tmp_path / "unsharded" / file).read_bytes() == (tmp_path / "copy" / file).read_bytes(), file


def test_an_fsdp_launch_that_accelerate_runs_unsharded_is_refused(monkeypatch):
    """accelerate 1.15 picks FSDP only for GPU-like processes: an FSDP config launched with --cpu runs DDP (or a
    single process) without a word. tuneline says so instead of training unsharded."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tuneline.train.fsdp import FsdpRefused, sharded

    on_cpu = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sharded(on_cpu) is False  # no FSDP asked for: plain DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(FsdpRefused, match=r"runs this process as MULTI_CPU \(2 process\(es\)\).*never on the CPU"):
        sharded(on_cpu)
