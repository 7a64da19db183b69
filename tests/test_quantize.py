"""model.quantize (tuneline.models.quantize) on the tiny RANDOM SDXL and Z-Image: what each level
stores and the exact bytes the memory estimate counts for it, a quantized run that trains and tracks
the unquantized one, exact resume, the exported LoRA, the quantized render pipeline, the refusal of a
fully trained quantized base, and a terminal without the quantization libraries' chatter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import Project, make_trainer
from resume_checks import assert_resumed_exactly
from test_train import (FAMILIES, RESUME_SETTINGS, FAMILY_RESUME_SETTINGS, checkpoint_of, family_project,
                        saved_tensor_bytes)
from test_train_zimage import zimage_project  # noqa: F401  (a fixture: the Z-Image latents project)

REPO = Path(__file__).resolve().parents[1]
LEVELS = ("int8", "fp8", "nf4")


def qparams(project: Project, level: str, **train):
    """The project's params with model.quantize at `level` and a short training run."""
    from tuneline.config import validate_params

    data = {**project.params_data, "model": {**project.params_data.get("model", {}), "quantize": level},
            "train": {"num_steps": 2, "seed": 7, "lr": 1e-3, "checkpoint": {"every_steps": 2, "keep_last": 2},
                      **train}}
    return validate_params(data)


# --- what a level stores -------------------------------------------------------------------------

@pytest.mark.parametrize("level", LEVELS)
def test_each_level_stores_what_the_byte_formula_says_tensor_for_tensor(level):
    """The formula (shapes only) against the tensors a real quantized layer holds, for odd shapes too;
    the meta device builds the same tensors; quantizing twice gives the same bytes; the layer computes
    what the full-precision one does, within the level's error."""
    from tuneline.models.quantize import (quantize_frozen, quantized_layers, quantized_tensor_bytes,
                                          stored_tensors)

    shapes = [(1, 1), (3, 5), (33, 70), (64, 128), (130, 257)]

    def model(device: str) -> torch.nn.Module:
        torch.manual_seed(0)
        layers = torch.nn.ModuleList([torch.nn.Linear(i, o, bias=o % 2 == 0, device=device) for o, i in shapes])
        layers.requires_grad_(False)
        if device != "meta":
            with torch.no_grad():
                layers[2].weight[4].zero_()  # an all-zero row: fp8's row scale would be 0 without its floor
        return layers

    reference = model("cpu")
    real, again, meta = model("cpu"), model("cpu"), model("meta")
    for module in (real, again, meta):
        assert quantize_frozen(module, level, torch.bfloat16) == len(shapes)
    for (out_features, in_features), layer, twin, empty, full in zip(shapes, real, again, meta, reference):
        assert layer.level == level and empty.level == level
        stored = stored_tensors(layer)
        formula = quantized_tensor_bytes(level, out_features, in_features)
        assert {name: t.numel() * t.element_size() for name, t in stored.items()} == formula, (level, layer)
        assert {name: (t.shape, t.dtype) for name, t in stored_tensors(empty).items()} == \
            {name: (t.shape, t.dtype) for name, t in stored.items()}
        assert all(torch.equal(t, stored_tensors(twin)[name]) for name, t in stored.items())
        x = torch.randn(4, in_features, dtype=torch.bfloat16)
        exact = torch.nn.functional.linear(x, full.weight.bfloat16(), None if full.bias is None else full.bias.bfloat16())
        out = layer(x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        error = ((out.float() - exact.float()).norm() / exact.float().norm()).item()
        assert error < {"int8": 0.02, "fp8": 0.08, "nf4": 0.15}[level], (level, out_features, in_features, error)
    assert len(list(quantized_layers([real]))) == len(shapes)


def test_nf4_on_the_meta_device_first_leaves_real_nf4_working():
    """bitsandbytes caches a code map on the device of the first tensor it quantizes: a memory estimate
    (meta device) first in a process must not break every real nf4 quantization after it. A fresh
    process, so the cache starts empty as it does in a user's `tuneline check` then train."""
    script = textwrap.dedent("""
        import torch
        from tuneline.models.quantize import quantize_frozen, stored_tensors
        meta = torch.nn.Sequential(torch.nn.Linear(64, 96, device="meta")).requires_grad_(False)
        assert quantize_frozen(meta, "nf4", torch.bfloat16) == 1
        real = torch.nn.Sequential(torch.nn.Linear(64, 96)).requires_grad_(False)
        assert quantize_frozen(real, "nf4", torch.bfloat16) == 1
        assert all(not t.is_meta for t in stored_tensors(real[0]).values())
        print("ok", tuple(real(torch.randn(2, 64, dtype=torch.bfloat16)).shape))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok (2, 96)"


def test_a_quantized_layer_keeps_only_its_quantized_weight_for_backward():
    """torchao's own linear saves a full-precision copy of the weight for backward (more than the layer it
    replaces); the quantized layer's autograd function saves none, and its input gradient is the
    dequantized weight's."""
    from tuneline.models.quantize import quantize_frozen

    for level in LEVELS:
        layer = torch.nn.Sequential(torch.nn.Linear(64, 96))
        layer.requires_grad_(False)
        quantize_frozen(layer, level, torch.float32)
        x = torch.randn(5, 64, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = layer(x)
        assert [t for t in saved if t.numel() >= 64 * 96] == [], level
        out.sum().backward()
        weight = layer[0].weight
        dequantized = (weight.dequantize() if level != "nf4" else __import__("bitsandbytes").functional.dequantize_4bit(
            weight.data, weight.quant_state)).float()
        assert torch.allclose(x.grad, torch.ones(5, 96) @ dequantized, atol=1e-4), level


# --- the memory estimate ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("level", LEVELS)
def test_the_estimate_counts_the_quantized_frozen_bytes_of_the_real_model(request, family, level, tmp_path):
    """On the meta device the estimate's frozen bytes, per dtype and level, equal the bytes of the
    tensors a real quantized trainer holds (text encoders included: uncached text), tensor for tensor."""
    from tuneline.models.quantize import quantized_layers, quantized_tensor_bytes, stored_tensors
    from tuneline.stages.train.memory import estimate_training_memory
    from tuneline.train import memory

    project = family_project(request, family)
    uncached = {"caption_dropout": 0.2} if family == "sdxl" else {}  # Z-Image's project caches no text
    params = qparams(project, level, mixed_precision="bf16", gradient_checkpointing=True, **uncached)
    trainer = make_trainer(project, tmp_path, params)
    modules = [*trainer.modules.values(), *trainer.adapter.frozen_modules().values()]
    layers = list(quantized_layers(modules))
    assert {layer.level for layer in layers} == {level} and len(layers) > 20
    real: dict[str, int] = {}
    weights = set()
    for layer in layers:
        stored = {name: t.numel() * t.element_size() for name, t in stored_tensors(layer).items()}
        assert stored == quantized_tensor_bytes(level, layer.out_features, layer.in_features)
        real[level] = real.get(level, 0) + sum(stored.values())
        weights.add(id(layer.weight))
    for tensor in {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}.values():
        if id(tensor) not in weights and not tensor.requires_grad:
            name = memory.dtype_name(tensor.dtype)
            real[name] = real.get(name, 0) + tensor.numel() * tensor.element_size()
    assert all(p.dtype == torch.float32 for p in trainer.parameters)  # LoRA trains in fp32 on top
    estimate = estimate_training_memory(params, project.root, bucket=(64, 64), batch_size=2)
    assert estimate.weights == real and {"bf16", level} <= set(real)
    assert estimate.trained == sum(p.numel() * 4 for p in trainer.parameters)
    assert f"frozen weights, {level}" in dict(estimate.rows())
    unquantized = estimate_training_memory(qparams(project, "none", mixed_precision="bf16",
                                                   gradient_checkpointing=True, **uncached),
                                           project.root, bucket=(64, 64), batch_size=2)
    assert estimate.weights_total < unquantized.weights_total


@pytest.mark.parametrize("family", FAMILIES)
def test_a_quantized_step_saves_no_more_for_backward_than_the_unquantized_one(request, family, tmp_path):
    """The real CPU step's saved tensors with a quantized base are those of the unquantized step (no
    dequantized weight kept), and the activation estimate bounds them as it does unquantized."""
    from tuneline.stages.train.memory import estimate_training_memory

    project = family_project(request, family)
    saved = {}
    for level in ("none", "int8", "nf4"):
        params = qparams(project, level)
        trainer = make_trainer(project, tmp_path / level, params)
        batch = trainer.adapter.example_batch(2, (64, 64), "cpu", with_text=trainer.data.text_cache)
        saved[level] = saved_tensor_bytes(trainer, batch)[0]
        estimate = estimate_training_memory(params, project.root, bucket=(64, 64), batch_size=2)
        assert 0.98 <= estimate.detail["saved"] / saved[level] <= 1.10, (level, estimate.detail, saved)
    assert saved["int8"] <= 1.01 * saved["none"] and saved["nf4"] <= 1.01 * saved["none"], saved


# --- training ---------------------------------------------------------------------------------

# Per-step relative loss gap of a quantized run to the unquantized one on the same seed, 8 steps at
# lr 1e-2 (measured on the tiny models: SDXL int8 0.0004, nf4 0.014; Z-Image int8 0.0003, nf4 0.004),
# with room for other CPUs. A broken quantization (a wrong scale, a NaN row) is off by far more.
LOSS_GAP = {"int8": 0.005, "nf4": 0.03}
_UNQUANTIZED: dict[str, tuple[float, float, list[float]]] = {}


def learning_run(project: Project, level: str, run: Path) -> tuple[float, float, list[float]]:
    """(loss on fixed noise before, after, the step losses) of 8 steps at lr 1e-2."""
    trainer = make_trainer(project, run, qparams(project, level, num_steps=8, lr=1e-2,
                                                 checkpoint={"every_steps": 8, "keep_last": 1}))
    before, losses = trainer.evaluate(seed=0), []
    trainer.fit(on_log=lambda state, result, seconds: losses.append(result.loss))
    return before, trainer.evaluate(seed=0), losses


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("level", ("int8", "nf4"))
def test_a_quantized_run_learns_and_its_loss_tracks_the_unquantized_run(request, family, level, tmp_path):
    project = family_project(request, family)
    if family not in _UNQUANTIZED:
        _UNQUANTIZED[family] = learning_run(project, "none", tmp_path / "none")
    plain_before, plain_after, plain = _UNQUANTIZED[family]
    before, after, losses = learning_run(project, level, tmp_path / level)
    gaps = [abs(q - p) / p for q, p in zip(losses, plain, strict=True)]
    print(f"{family} {level}: loss gap max {max(gaps):.4f}, fixed-noise loss {before:.4f} -> {after:.4f} "
          f"(unquantized {plain_before:.4f} -> {plain_after:.4f})")
    assert 0 < max(gaps) <= LOSS_GAP[level], gaps  # quantized (not the same run), and close to it
    assert after < 0.97 * before  # it learns (measured 0.94-0.95 of the start, quantized or not)
    assert abs(after / before - plain_after / plain_before) <= 0.01


@pytest.mark.parametrize("family, level, settings", [
    ("sdxl", "int8", {}), ("zimage", "nf4", {"mixed_precision": "bf16", "gradient_checkpointing": True})])
def test_resume_is_exact_on_a_quantized_base(request, family, level, settings, tmp_path):
    """As test_train's exact resume (EMA, caption dropout through the quantized text encoders, LoRA
    dropout, a schedule; SDXL renders live samples at every step through its quantized pipeline;
    Z-Image under bf16 autocast, its frozen base quantized from bf16)."""
    import signal

    from tuneline.train.trainer import StopRequested

    project = family_project(request, family)
    params = qparams(project, level, **RESUME_SETTINGS, **FAMILY_RESUME_SETTINGS[family], **settings)
    live_every = 1 if family == "sdxl" else 0
    straight = make_trainer(project, tmp_path / "a", params, live_every=live_every)
    base = straight.trained_weights()
    straight.fit()

    def stop_at_two(state, result, seconds):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    halves = make_trainer(project, tmp_path / "b", params, live_every=live_every)
    with pytest.raises(StopRequested):
        halves.fit(on_log=stop_at_two)
    resumed = make_trainer(project, tmp_path / "b", params, live_every=live_every)
    assert resumed.state.step == 2
    resumed.fit()
    assert_resumed_exactly(checkpoint_of(tmp_path / "a", 4), checkpoint_of(tmp_path / "b", 4), base,
                           resumed_at=2, ema=True)


# --- what a quantized run leaves: the exported LoRA, the render ---------------------------------------

def train_stage(project: Project, params, out: Path) -> Path:
    from accelerate.state import AcceleratorState

    from tuneline.stages.train.stage import run

    AcceleratorState._reset_state(True)
    run(params, project.root, project.root / "data/latents", out / "models/train", checkpoint_dir=out / "checkpoints")
    return out / "models/train"


def export_stage(project: Project, params, trained: Path, out: Path) -> Path:
    from tuneline.config import validate_params
    from tuneline.stages.export.stage import run

    params = validate_params({**params.model_dump(mode="json"), "export": {"name": "demo"}})
    run(params, project.root, trained, out / "renders", out / "export")
    return out / "export/demo.safetensors"


def tiny_pipeline(family: str):
    import diffusers

    from tuneline.models.family import get_family
    from tuneline.models.ref import resolve_model

    return getattr(diffusers, get_family(family).render.pipeline).from_pretrained(resolve_model(f"tiny-{family}"))


def render(pipeline) -> torch.Tensor:
    return pipeline("alf, a red thing", height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
                    generator=torch.Generator().manual_seed(3), output_type="pt").images


@pytest.mark.parametrize("family", FAMILIES)
def test_a_quantized_runs_lora_exports_as_before_and_renders_on_a_quantized_base(request, family, tmp_path):
    """The exported file of a quantized run has the keys, shapes and dtypes of an unquantized run's;
    the real client (diffusers on the plain base) renders from it what it renders from the run's own
    diffusers-format LoRA; and the render stage's quantized base pipeline takes the LoRA on top."""
    from tuneline.models.quantize import QuantizedLayer
    from tuneline.stages.render.generate import apply_trained, load_base_pipeline

    project = family_project(request, family)
    files = {}
    for level in ("none", "nf4"):
        params = qparams(project, level, lr=1e-2, lora={"rank": 4, "alpha": 2.0})
        trained = train_stage(project, params, tmp_path / level)
        files[level] = export_stage(project, params, trained, tmp_path / level)
    layouts = []
    for path in files.values():
        with safe_open(path, "pt") as handle:
            layouts.append({key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                            for key in handle.keys()})
    assert layouts[0] == layouts[1] and len(layouts[0]) > 8

    images = []
    for lora in (files["nf4"], tmp_path / "nf4/models/train"):
        pipe = tiny_pipeline(family)
        pipe.load_lora_weights(lora)
        images.append(render(pipe))
    assert torch.allclose(images[0], images[1], atol=1e-5)

    params = qparams(project, "int8", lora={"rank": 4, "alpha": 2.0})
    quantized = load_base_pipeline(params.model, project.root, "cpu", "fp32")
    denoiser = getattr(quantized, "unet" if family == "sdxl" else "transformer")
    encoders = [quantized.text_encoder] + ([quantized.text_encoder_2] if family == "sdxl" else [])
    for module in (denoiser, *encoders):
        assert any(isinstance(sub, QuantizedLayer) for sub in module.modules()), type(module).__name__
    assert not any(isinstance(sub, QuantizedLayer) for sub in quantized.vae.modules())
    base = render(quantized)
    apply_trained(quantized, tmp_path / "nf4/models/train")
    wrapped = {type(sub).__name__ for name, sub in denoiser.named_modules() if name.endswith("to_q")}
    assert wrapped == {"TorchaoLoraLinear"}, wrapped  # PEFT's LoRA layer over a torchao weight
    on_quantized = render(quantized)
    print(f"{family}: LoRA on the int8 base vs on the plain base: mean |diff| "
          f"{(on_quantized - images[1]).abs().mean():.5f}; vs the int8 base alone {(on_quantized - base).abs().mean():.5f}")
    # The LoRA on the int8 base renders close to the LoRA on the plain base (mean |diff| 0.0002-0.0003 in
    # [0, 1], measured) and away from the int8 base alone (0.008-0.009): the LoRA is really on top.
    assert torch.isfinite(on_quantized).all()
    assert (on_quantized - images[1]).abs().mean() < 0.002
    assert (on_quantized - base).abs().mean() > 10 * (on_quantized - images[1]).abs().mean()


# --- refusals and the terminal ----------------------------------------------------------------

def test_check_refuses_training_a_quantized_base_fully(latents_project, capsys, tmp_path):
    """`tuneline check` names train.mode and model.quantize; the adapter refuses it too."""
    from tuneline.cli import main
    from tuneline.core.params import ParamsError
    from tuneline.models.sdxl.adapter import SDXLAdapter

    root = latents_project.root
    for section, key in (({"mode": "full"}, "train.mode"), ({"text_encoder_2": {"mode": "full"}},
                                                             "train.text_encoder_2.mode")):
        data = {**latents_project.params_data, "model": {"quantize": "int8"}, "train": section}
        (tmp_path / "full.yaml").write_text(yaml.safe_dump(data), "utf-8")
        assert main(["--root", str(root), "--params", str(tmp_path / "full.yaml"), "check"]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert f"{key}: 'full' cannot train a quantized base (model.quantize: 'int8'" in out, out
        assert ("allowed with it: 'lora';" if key == "train.mode" else "allowed with it: 'lora' or 'frozen';") in out
    params = qparams(latents_project, "nf4", mode="full")
    with pytest.raises(ParamsError, match="train.mode: 'full' cannot train a quantized base"):
        SDXLAdapter(params.model, params.train, root)


def test_the_terminal_shows_no_quantization_library_chatter(latents_project, tmp_path):
    """A stage that quantizes (latents: the text encoders at int8) and `tuneline check` print none of
    what torchao, bitsandbytes and torch's pytree say when PEFT imports them; the stage log keeps it."""
    root = tmp_path / "project"
    shutil.copytree(latents_project.root, root, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    data = {**latents_project.params_data, "model": {"quantize": "int8"}}
    (root / "params.yaml").write_text(yaml.safe_dump(data), "utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "DO_NOT_TRACK": "1"}
    noise = ("torchao", "bitsandbytes", "_pytree", "Failed to load", "kernels-community", "TorchaoLoraLinear")
    for command in (["latents"], ["check"]):
        done = subprocess.run([sys.executable, "-m", "tuneline.cli", *command], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        terminal = done.stdout + done.stderr
        assert not [word for word in noise if word in terminal], terminal
    assert "frozen weights, int8" in terminal  # check's estimate built the int8 model
    log = (root / ".tuneline/logs/latents.log").read_text("utf-8")
    assert "torchao" in log
