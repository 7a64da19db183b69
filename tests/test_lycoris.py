"""LoHa and LoKr (train.lora.type): PEFT's LoHaConfig / LoKrConfig trained by both families, saved and resumed
exactly, rendered from the trained file, and exported in LyCORIS' tensor names under kohya's (SDXL) or ComfyUI's
(Z-Image) module names, with alpha.

The exported files were loaded with the real loaders in a scratch venv (ComfyUI's and LyCORIS' own modules
imported directly; no network, so not in CI), on the tiny models with random adapters of every kind (LoHa, LoKr
with factor -1 / 4, decompose_both, both factors full; SDXL with conv layers and text encoder 1), and every
applied weight equals PEFT's base + delta (max relative error 0 for ComfyUI, 1e-6 for LyCORIS' float path):
- ComfyUI, Comfy-Org/ComfyUI @ a125cd84b054a57729b5eecab930ca9408719832: comfy/lora.py `load_lora`,
  `model_lora_keys_unet` (SGM names), `model_lora_keys_clip`, `calculate_weight`; comfy/weight_adapter/loha.py and
  lokr.py (LoKr's alpha / dim rule, unchanged @ 2bffe2f4ce5763dcb83df6a670657b6d5c8f85a5). Z-Image: the Lumina2
  branch of `model_lora_keys_unet` @ ec93dcacb96b922f7cb1417b3ba22bccb082df32 (`diffusion_model.<diffusers module>`
  keys, any weight adapter) with `z_image_to_diffusers` @ 09708eae709a992a5684bed3595ce4d07e705b4e, patches applied
  with their qkv offsets on the fused checkpoint.
- LyCORIS, KohakuBlueleaf/LyCORIS @ f49d30d670591ec8841d241d79aaa8449b30a715: lycoris/kohya.py
  `create_network_from_weights` over SGM / CLIP module trees, lycoris/modules/loha.py `LohaModule` and lokr.py
  `LokrModule` (`make_module_from_state_dict`, its factor inference included), their forward. Their merge path
  (`get_diff_weight` / `merge_to`) scales by (alpha / rank)^2 (`get_weight` scales already and get_diff_weight
  again): equal to PEFT only when alpha == rank.

Here (no network) the loaders' math and key handling are replicated on the exported tensors, as test_export does
for LoRA, from the files and commits above.

diffusers 0.42.1 (installed): `load_lora_weights` refuses an SDXL LoHa / LoKr kohya file (ValueError: keys "have not
been correctly renamed") and a Z-Image LoHa; a Z-Image LoKr (`diffusion_model.*.lokr_*`, ai-toolkit's layout) it
converts, baking alpha / rank into lokr_w1 (`_bake_lokr_alpha_`, none for two full factors) and builds a LoKrConfig:
the same deltas (checked in the scratch venv: max error 0).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from resume_checks import assert_resumed_exactly, checkpoint_at

RANK, ALPHA = 4, 3.0  # alpha != rank: every scale is exercised
DATASETS = [{"name": "a", "path": "data/raw/a"}]


# --- the loaders' math, replicated (see the module docstring for the files and commits) -----------------

def comfy_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """ComfyUI's weight adapters: LoHa (loha.py) scales by alpha / hada_w1_b.shape[0]; LoKr (lokr.py) by
    alpha / dim where dim is the rank of a decomposed factor (w2's when both are), else by 1."""
    if "hada_w1_a" in t:
        scale = t["alpha"].item() / t["hada_w1_b"].shape[0]
        return scale * ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = t["alpha"].item() / dim if dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(shape)


def lycoris_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """LyCORIS' modules as make_module_from_state_dict builds them, their forward's delta: LohaModule scales by
    alpha / lora_dim (hada_w1_b.size(0)); LokrModule's lora_dim is w1_a's (else w2_a's) size(1), and with both
    factors full (full_matrix, lora_dim 1) alpha = lora_dim: scale 1. make_kron unsqueezes w1 to w2's dims."""
    if "hada_w1_a" in t:
        return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (
            t["alpha"].item() / t["hada_w1_b"].size(0))).reshape(shape)
    full = "lokr_w1_a" not in t and "lokr_w2_a" not in t
    lora_dim = 1 if full else (t["lokr_w1_a"] if "lokr_w1_a" in t else t["lokr_w2_a"]).size(1)
    alpha = lora_dim if full else t["alpha"].item()
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    return (torch.kron(w1, w2) * (alpha / lora_dim)).view(shape)


def randomize(modules: dict[str, Any], seed: int = 0) -> None:
    """Every trained parameter random (PEFT starts each adapter at zero delta), so a delta checks something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            for parameter in (p for p in module.parameters() if p.requires_grad):
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def peft_deltas(module: Any, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (base weight, PEFT's delta) of every layer holding `adapter`."""
    found = {}
    for name, layer in module.named_modules():
        if adapter in getattr(layer, "_available_adapters", ()) and hasattr(layer, "get_delta_weight"):
            found[name.replace(".base_layer", "")] = (layer.get_base_layer().weight.detach(),
                                                      layer.get_delta_weight(adapter).detach())
    return found


def by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, part = key.rpartition(".")
        grouped.setdefault(module, {})[part] = value
    return grouped


def assert_delta(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert expected.abs().max() > 0, f"{what}: a zero delta checks nothing"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()), msg=what)


# --- LyCORIS' layout from PEFT's tensors, on layers built here --------------------------------------------

LAYOUTS = {  # train.lora settings -> the LoKr factor kinds the tiny layers must produce
    "loha": ({"type": "loha"}, None),
    "lokr_factor4": ({"type": "lokr", "factor": 4}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "lokr_full": ({"type": "lokr"}, {"lokr_w1", "lokr_w2"}),  # rank >= half of w2's sides: both factors full
    "lokr_both": ({"type": "lokr", "decompose_both": True, "rank": 2}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a",
                                                                         "lokr_w2_b"}),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_lycoris_tensors_give_peft_delta_in_comfyui_and_lycoris(name):
    """Linear, 3x3 and 1x1 conv layers with a random PEFT adapter: the exported tensors rebuild PEFT's delta
    exactly in ComfyUI's and LyCORIS' math (a LoKr of two full factors has alpha / rank folded into lokr_w2 and
    alpha = rank, since both readers scale it by 1)."""
    from peft import inject_adapter_in_model

    from tuneline.models.lycoris import adapter_settings, lycoris_module_tensors, peft_config, trained_state_dict
    from tuneline.train.config import LoraConfig

    settings, factors = LAYOUTS[name]
    lora = LoraConfig(**{"rank": RANK, "alpha": ALPHA, **settings})
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"linear": torch.nn.Linear(64, 64), "conv": torch.nn.Conv2d(64, 64, 3, padding=1),
                                 "pointwise": torch.nn.Conv2d(64, 64, 1)})
    config = adapter_settings(lora, ["linear", "conv", "pointwise"])
    inject_adapter_in_model(peft_config(config), model)
    randomize({"model": model})
    deltas = peft_deltas(model)
    assert set(deltas) == {"linear", "conv", "pointwise"}
    for module, parts in by_module(trained_state_dict(model)).items():
        exported = lycoris_module_tensors(parts, config, module)
        if factors is not None:
            assert set(exported) - {"alpha"} == factors, (module, sorted(exported))
        if factors == {"lokr_w1", "lokr_w2"}:
            assert exported["alpha"].item() == lora.rank
            assert torch.allclose(exported["lokr_w2"], parts["lokr_w2"] * (ALPHA / lora.rank))
        else:
            assert exported["alpha"].item() == ALPHA  # the real alpha
        base, delta = deltas[module]
        assert_delta(comfy_delta(exported, base.shape), delta, f"ComfyUI {module}")
        assert_delta(lycoris_delta(exported, base.shape), delta, f"LyCORIS {module}")


def test_tucker_mixed_and_unranked_modules_are_refused():
    from tuneline.models.lycoris import lycoris_module_tensors

    loha = {part: torch.ones(2, 2) for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    with pytest.raises(ValueError, match="Tucker"):
        lycoris_module_tensors({**loha, "hada_t1": torch.ones(2, 2, 3, 3)}, {"r": 2, "alpha": 2.0}, "m")
    with pytest.raises(ValueError, match="mixes LoHa and LoKr"):
        lycoris_module_tensors({**loha, "lokr_w1": torch.ones(2, 2)}, {"r": 2, "alpha": 2.0}, "m")
    with pytest.raises(ValueError, match="needs hada_w1_a"):
        lycoris_module_tensors({"hada_w1_a": torch.ones(2, 2)}, {"r": 2, "alpha": 2.0}, "m")
    with pytest.raises(ValueError, match="ranks \\[2\\] in the weights, settings say rank 4"):
        lycoris_module_tensors(loha, {"r": 4, "alpha": 2.0}, "m")
    with pytest.raises(ValueError, match="no alpha"):
        lycoris_module_tensors(loha, {"r": 2}, "m")


# --- settings -------------------------------------------------------------------------------------------

def test_settings_refusals_and_the_run_key_of_older_runs():
    """Off by default, and a LoRA's PEFT arguments (its file's metadata) are the ones it always had; the
    settings away from their type are refused naming the key, value and what is allowed; a LoRA run key is
    the one written before train.lora.type existed."""
    from tuneline.config import validate_params
    from tuneline.core.params import ParamsError
    from tuneline.models.lycoris import adapter_settings, problems
    from tuneline.train import checkpoint
    from tuneline.train.config import LoraConfig, TrainConfig

    default = LoraConfig()
    assert (default.type, default.factor, default.decompose_both) == ("lora", -1, False)
    assert adapter_settings(default, ["to_q"]) == {"r": 16, "lora_alpha": 16.0, "use_dora": False,
                                                   "target_modules": ["to_q"]}
    assert adapter_settings(LoraConfig(type="lokr", factor=8, rank=4, alpha=2.0), ["to_q"]) == {
        "peft_type": "LOKR", "r": 4, "alpha": 2.0, "target_modules": ["to_q"], "decompose_factor": 8,
        "decompose_both": False}
    for settings, message in (
            ({"type": "loha", "use_dora": True}, "use_dora: true applies to type 'lora' only"),
            ({"type": "lokr", "dropout": 0.1}, "dropout: 0.1 applies to type 'lora' only"),
            ({"type": "loha", "factor": 4}, "factor: 4 applies to type 'lokr' only; allowed with type 'loha': -1"),
            ({"decompose_both": True}, "decompose_both: true applies to type 'lokr' only"),
            ({"type": "lokr", "factor": 0}, "factor: 0; allowed: -1 (balanced) or a number >= 1"),
            ({"type": "boft"}, "Input should be 'lora', 'loha' or 'lokr'")):
        with pytest.raises(ParamsError, match="train.lora") as error:
            validate_params({"datasets": DATASETS, "train": {"lora": settings}})
        assert message in str(error.value)
    lokr = TrainConfig(lora={"type": "lokr"})
    [line] = problems("nf4", lokr)
    assert line.startswith("model.quantize: 'nf4' with train.lora.type 'lokr'") and "'int8', 'fp8'" in line
    assert problems("int8", lokr) == [] and problems("nf4", TrainConfig()) == []
    assert problems("nf4", lokr.model_copy(update={"mode": "full"})) == []  # no adapter trained

    dumped = TrainConfig().model_dump(mode="json")
    older = {**dumped, "lora": {k: v for k, v in dumped["lora"].items()
                                if k not in ("type", "factor", "decompose_both")}}
    key = checkpoint.run_key(dumped, {"base": "b"}, "d", 1, {})
    assert checkpoint.run_key(older, {"base": "b"}, "d", 1, {}) == key
    assert checkpoint.with_added_defaults(older, dumped) == dumped  # an older checkpoint compares as set
    assert checkpoint.run_key(TrainConfig(lora={"type": "loha"}).model_dump(mode="json"),
                              {"base": "b"}, "d", 1, {}) != key


def test_tuneline_check_names_the_combination(tmp_path):
    from tuneline.core.params import ParamsError
    from tuneline.preflight import check_settings
    from tuneline.config import validate_params

    params = validate_params({"datasets": DATASETS, "model": {"base": "tiny-zimage", "quantize": "nf4"},
                              "train": {"lora": {"type": "loha"}}})
    with pytest.raises(ParamsError, match="model.quantize: 'nf4' with train.lora.type 'loha'"):
        check_settings(params, tmp_path)


# --- both families: train, save, export, render -----------------------------------------------------------

FAMILY_CASES = {  # family -> its adapter, the settings, what to train beside the denoiser
    "sdxl": ({"type": "loha", "targets": "all"}, {"text_encoder_1": {"mode": "lora"}}),
    "zimage": ({"type": "lokr", "factor": 4, "targets": "attention_mlp"}, {}),
}


def _adapter(family: str, root: Path):
    from tuneline.models.config import ModelConfig
    from tuneline.models.sdxl.adapter import SDXLAdapter
    from tuneline.models.zimage.adapter import ZImageAdapter
    from tuneline.train.config import TrainConfig

    lora, extra = FAMILY_CASES[family]
    train = TrainConfig(lora={"rank": RANK, "alpha": ALPHA, **lora}, **extra)
    adapter = {"sdxl": SDXLAdapter, "zimage": ZImageAdapter}[family](ModelConfig(base=f"tiny-{family}"), train, root)
    adapter.load(conditioning_cached=True)
    adapter.setup_training()
    return adapter, train


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_trained_file_exports_renders_and_diffusers_refuses_or_reads_it(family, tmp_path):
    """The family's adapter trains PEFT's LoHa / LoKr; its saved file names the type; the exporter writes
    LyCORIS tensors that rebuild every trained delta through ComfyUI's math (kohya SGM names for SDXL, its text
    encoder included; `diffusion_model.` names for Z-Image); render's loader puts the same deltas on a fresh
    pipeline at the render scale. diffusers: SDXL's kohya reader refuses the file; Z-Image's reads a LoKr."""
    import diffusers

    from tuneline.models.family import get_family
    from tuneline.models.lycoris import LYCORIS_SUFFIXES
    from tuneline.models.sdxl.kohya_lora import kohya_module_name
    from tuneline.models.sdxl.sgm_unet import sgm_module_prefixes
    from tuneline.stages.render.generate import ADAPTER_NAME, apply_trained
    from tuneline.tiny import resolve_tiny
    from tuneline.train.output import LORA_FILE

    adapter, train = _adapter(family, tmp_path)
    modules = adapter.trained_modules()
    randomize(modules)
    trained = {name: peft_deltas(module) for name, module in modules.items()}
    adapter.save(modules, tmp_path / "train")
    with safe_open(str(tmp_path / "train" / LORA_FILE), "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    saved_as = {"unet": "unet", "text_encoder_1": "text_encoder", "transformer": "transformer"}
    assert {metadata[f"{saved_as[name]}.peft_type"] for name in modules} == {"LOHA" if family == "sdxl" else "LOKR"}

    exporter = get_family(family).build_exporter()
    out = exporter.write_lora(tmp_path / "train" / LORA_FILE, tmp_path / "out.safetensors", {"k": "v"},
                              adapter.model_config, tmp_path)
    exported = load_file(str(out))
    assert all(key.endswith((".alpha", *LYCORIS_SUFFIXES)) for key in exported)
    grouped = by_module(exported)
    if family == "sdxl":
        prefixes = sgm_module_prefixes(adapter.unet.config)
        components = {"unet": "unet", "text_encoder_1": "text_encoder"}
        names = {name: {kohya_module_name(components[name], module, prefixes): module for module in deltas}
                 for name, deltas in trained.items()}
        assert "lora_unet_input_blocks_1_0_in_layers_2" in names["unet"]  # a conv layer (targets all)
    else:
        names = {"transformer": {f"diffusion_model.{module}": module for module in trained["transformer"]}}
    assert set(grouped) == {key for mapped in names.values() for key in mapped}
    for name, mapped in names.items():
        for key, module in mapped.items():
            base, delta = trained[name][module]
            assert_delta(comfy_delta(grouped[key], base.shape), delta, key)

    tiny = resolve_tiny(f"tiny-{family}")
    pipeline_class = getattr(diffusers, get_family(family).render.pipeline)
    if family == "sdxl":
        with pytest.raises(ValueError, match="not been correctly renamed"):
            pipeline_class.lora_state_dict(exported, unet_config=adapter.unet.config)
    else:
        converted = pipeline_class.lora_state_dict(dict(exported))
        assert {key.rpartition(".")[0] for key in converted} == {f"transformer.{m}" for m in trained["transformer"]}

    pipeline = pipeline_class.from_pretrained(tiny)
    applied = apply_trained(pipeline, tmp_path / "train", lora_scale=0.5)
    assert applied.loaded[-1].startswith("LoHa " if family == "sdxl" else "LoKr ")
    components = {"unet": "unet", "text_encoder_1": "text_encoder", "transformer": "transformer"}
    for name, deltas in trained.items():
        rendered = peft_deltas(getattr(pipeline, components[name]), ADAPTER_NAME)
        assert set(rendered) == set(deltas)
        for module, (_, delta) in deltas.items():
            assert_delta(rendered[module][1], 0.5 * delta, f"render {name}.{module}")


def test_a_training_adapters_wrapper_stays_out_of_the_saved_names(tmp_path):
    """With model.training_adapter PEFT nests the trained LoKr layer inside the adapter's LoRA layer
    (`to_q.base_layer.lokr_w1`); the saved file names the module as a fresh model has it."""
    from tuneline.models.config import ModelConfig
    from tuneline.models.zimage.adapter import ZImageAdapter
    from tuneline.train.config import TrainConfig
    from tuneline.train.output import LORA_FILE

    adapter = ZImageAdapter(ModelConfig(base="tiny-zimage", training_adapter={"ref": "tiny-zimage-training-adapter"}),
                            TrainConfig(lora={"type": "lokr", "rank": RANK}), tmp_path)
    adapter.load(conditioning_cached=True)
    adapter.setup_training()
    nested = [n for n, p in adapter.transformer.named_parameters() if p.requires_grad]
    assert nested and all(".base_layer.lokr_" in n for n in nested)
    adapter.save(adapter.trained_modules(), tmp_path)
    saved = load_file(str(tmp_path / LORA_FILE))
    assert sorted(saved) == sorted("transformer." + n.replace(".base_layer", "").removesuffix(".default")
                                   for n in nested)


# --- exact resume -------------------------------------------------------------------------------------------

class RandomLatents:
    """TrainingData of four fixed random items (latents and cached text embeddings drawn from each item's
    index, shaped as the adapter's example batch): the trainer's checkpoints and resume without a latents
    stage."""

    text_cache = True

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    def digest(self) -> str:
        return "random-latents-v1"

    def batching(self) -> dict[str, int]:
        return {"64x64": 2}

    def sample_refs(self) -> list[Any]:
        from tuneline.train.sampler import SampleRef

        return [SampleRef(index, (64, 64)) for index in range(4)]

    def batch_size_for(self, bucket: tuple[int, int]) -> int:
        return 2

    def batch(self, indices: list[int], generator: Any, python_rng: Any, device: Any) -> dict[str, Any]:
        batch = self.adapter.example_batch(len(indices), (64, 64), device)
        for row, index in enumerate(indices):
            drawn = torch.Generator().manual_seed(index)
            for key in ("latents", "prompt_embeds", "pooled"):
                if key in batch:
                    batch[key][row].copy_(torch.randn(batch[key][row].shape, generator=drawn))
        return batch


RESUME_CASES = {  # family -> its adapter settings: SDXL a LoKr on conv layers too, both factors decomposed
    "sdxl": {"type": "lokr", "rank": 2, "alpha": 3.0, "targets": "all", "decompose_both": True},
    "zimage": {"type": "loha", "rank": RANK, "alpha": ALPHA, "targets": "attention_mlp"},
}


def _trainer(family: str, root: Path) -> Any:
    from accelerate.state import AcceleratorState

    from tuneline.models.config import ModelConfig
    from tuneline.models.registry import build_adapter
    from tuneline.train.adapter import ModelSource
    from tuneline.train.config import TrainConfig
    from tuneline.train.trainer import Trainer

    AcceleratorState._reset_state(True)  # one process, many trainers
    model = ModelConfig(base=f"tiny-{family}")
    train = TrainConfig(lora=RESUME_CASES[family], num_steps=2, seed=7, lr=1e-3, ema={"enabled": True, "decay": 0.9},
                        checkpoint={"every_steps": 1, "keep_last": 2})
    adapter = build_adapter(family, model, train, root)
    trainer = Trainer(train, adapter, RandomLatents(adapter), ModelSource(model.model_dump(mode="json")),
                      root / "checkpoints")
    trainer.setup()
    return trainer


@pytest.mark.parametrize("family", RESUME_CASES)
def test_resume_is_exact(family, tmp_path):
    """A LoKr / LoHa run stopped after step 1 and resumed from its checkpoint ends with the trained weights,
    optimizer state and EMA of a straight 2-step run."""
    from tuneline.train.trainer import StopRequested

    straight = _trainer(family, tmp_path / "a")
    base = straight.trained_weights()
    part = "lokr_w1_a" if family == "sdxl" else "hada_w2_b"
    assert any(f".{part}." in name for name in base)
    straight.fit()

    def stop_at_one(state, result, seconds):
        if state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(StopRequested):
        _trainer(family, tmp_path / "b").fit(on_log=stop_at_one)
    resumed = _trainer(family, tmp_path / "b")
    assert resumed.state.step == 1
    resumed.fit()
    assert_resumed_exactly(checkpoint_at(tmp_path / "a" / "checkpoints", 2),
                           checkpoint_at(tmp_path / "b" / "checkpoints", 2), base, resumed_at=1, ema=True)
