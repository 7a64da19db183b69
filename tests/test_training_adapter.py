"""model.training_adapter on both families: a frozen LoRA active in the training steps only (it changes the
loss), never in the result (the saved and exported LoRA, the checkpoints, the EMA, live samples, the final
render); exact resume with it; its identity in the run key and models/identity; the settings refused.
The adapters are tuneline.tiny's RANDOM ones (`tiny-<family>-training-adapter`)."""

from __future__ import annotations

import os
import signal
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import Project, make_trainer, train_params
from resume_checks import assert_resumed_exactly, assert_same_tensors
from test_train_zimage import zimage_project  # noqa: F401  (a fixture: the Z-Image latents project)

FAMILIES = ("sdxl", "zimage")
PROJECTS = {"sdxl": "latents_project", "zimage": "zimage_project"}
DENOISER = {"sdxl": "unet", "zimage": "transformer"}
LORA_FILE = "pytorch_lora_weights.safetensors"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


TINY = "tiny"  # adapter_params: the family's tiny RANDOM training adapter


def adapter_params(project: Project, adapter: object = TINY, variant: str | None = None, **train):
    """train_params with model.training_adapter (None: none) and model.variant."""
    from tuneline.config import validate_params

    family = project.params_data.get("model", {}).get("base", "tiny-sdxl").removeprefix("tiny-")
    data = train_params(project, **train).model_dump(mode="json")
    data["model"].update(training_adapter=f"tiny-{family}-training-adapter" if adapter == TINY else adapter,
                         variant=variant)
    return validate_params(data)


def adapter_tensors(module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if ".training_adapter." in name}


def denoiser_of(trainer, family: str):
    return trainer.accelerator.unwrap_model(trainer.modules[DENOISER[family]])


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory):
    """Per family: 2 steps without and with the tiny training adapter (same seed), the losses before
    training, and both results saved."""
    family = request.param
    project = request.getfixturevalue(PROJECTS[family])
    run = tmp_path_factory.mktemp(f"adapter-{family}")
    plain = make_trainer(project, run / "plain", train_params(project))
    adapted = make_trainer(project, run / "adapted", adapter_params(project))
    start = {"plain": plain.trained_weights(), "adapted": adapted.trained_weights()}
    evaluated = {"plain": plain.evaluate(seed=0), "adapted": adapted.evaluate(seed=0)}
    fits = {"plain": plain.fit(), "adapted": adapted.fit()}
    for name, trainer in (("plain", plain), ("adapted", adapted)):
        trainer.save_outputs(run / name / "out")
    return {"family": family, "project": project, "run": run, "plain": plain, "adapted": adapted, "start": start,
            "evaluated": evaluated, "fits": fits}


def test_the_adapter_is_frozen_and_leaves_the_lora_initialisation_alone(trained):
    family, plain, adapted = trained["family"], trained["plain"], trained["adapted"]
    assert_same_tensors(trained["start"]["plain"], trained["start"]["adapted"], "trained LoRA before step 1")
    from tuneline.tiny import tiny_training_adapter_file

    loaded = adapter_tensors(denoiser_of(adapted, family))
    assert len(loaded) == len(load_file(tiny_training_adapter_file(f"tiny-{family}-training-adapter")))
    assert not any(p.requires_grad for p in loaded.values())  # no gradient, so not in the optimizer
    assert [len(u.parameters) for u in plain.units] == [len(u.parameters) for u in adapted.units]
    optimized = {id(p) for u in adapted.units for group in u.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in loaded.values()}
    assert denoiser_of(adapted, family).active_adapters() == ["default", "training_adapter"]


def test_the_adapter_changes_the_loss(trained):
    evaluated, fits = trained["evaluated"], trained["fits"]
    print(f"{trained['family']}: loss on fixed noise {evaluated['plain']:.5f} plain, {evaluated['adapted']:.5f} "
          f"with the training adapter")
    # Same seed, same initial LoRA, same batches and noise: without the adapter the numbers would be bit-equal.
    # (The tiny models' outputs are small next to the flow / noise targets, so the change is small too.)
    assert evaluated["plain"] != evaluated["adapted"]
    assert abs(evaluated["plain"] - evaluated["adapted"]) > 1e-6 * abs(evaluated["plain"])
    assert fits["plain"]["final_loss"] != fits["adapted"]["final_loss"]


def test_the_saved_lora_and_the_checkpoints_hold_the_trained_lora_alone(trained):
    from peft.utils import get_peft_model_state_dict

    family, run, adapted = trained["family"], trained["run"], trained["adapted"]
    plain_lora, adapted_lora = (load_file(run / name / "out" / LORA_FILE) for name in ("plain", "adapted"))
    assert adapted_lora.keys() == plain_lora.keys()
    assert not any("training_adapter" in key for key in adapted_lora)
    trained_lora = get_peft_model_state_dict(denoiser_of(adapted, family), adapter_name="default")
    denoiser = DENOISER[family]
    assert {f"{denoiser}.{key}" for key in trained_lora} == {k for k in adapted_lora if k.startswith(f"{denoiser}.")}
    for key, value in trained_lora.items():
        assert torch.equal(adapted_lora[f"{denoiser}.{key}"], value.cpu()), key
    assert any(not torch.equal(adapted_lora[k], plain_lora[k]) for k in adapted_lora)  # it trained otherwise
    [plain_ckpt] = (run / "plain" / "checkpoints").glob("*/step_000002")
    [adapted_ckpt] = (run / "adapted" / "checkpoints").glob("*/step_000002")
    assert load_file(adapted_ckpt / "trained.safetensors").keys() == \
        load_file(plain_ckpt / "trained.safetensors").keys()


def test_the_exported_lora_holds_the_trained_lora_alone(trained, tmp_path):
    """The export stage's files (kohya / ComfyUI layouts) of the adapted run have the keys of the plain run's."""
    from tuneline.models.family import get_family

    family, run = trained["family"], trained["run"]
    exporter = get_family(family).build_exporter()
    keys = {}
    for name in ("plain", "adapted"):
        written = exporter.write_lora(run / name / "out" / LORA_FILE, tmp_path / f"{name}.safetensors", {},
                                      trained["project"].params().model, trained["project"].root)
        keys[name] = set(load_file(written).keys())
    assert keys["adapted"] == keys["plain"] and not any("training_adapter" in k for k in keys["adapted"])


def test_the_memory_estimate_counts_the_adapter_weights_exactly(trained):
    """On the meta device the adapter's layers come from its file's header: the estimate's frozen bytes equal the
    real adapted trainer's, and exceed the plain estimate by the adapter's tensors."""
    from tuneline.stages.train.memory import estimate_training_memory
    from tuneline.tiny import tiny_training_adapter_file
    from tuneline.train import memory

    family, project, adapted = trained["family"], trained["project"], trained["adapted"]
    modules = [*adapted.modules.values(), *adapted.adapter.frozen_modules().values()]
    real: dict[str, int] = {}
    for tensor in {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}.values():
        if not tensor.requires_grad:
            name = memory.dtype_name(tensor.dtype)
            real[name] = real.get(name, 0) + tensor.numel() * tensor.element_size()
    with_adapter = estimate_training_memory(adapter_params(project), project.root, bucket=(64, 64), batch_size=1)
    plain = estimate_training_memory(train_params(project), project.root, bucket=(64, 64), batch_size=1)
    assert with_adapter.weights == real
    file = load_file(tiny_training_adapter_file(f"tiny-{family}-training-adapter"))
    assert with_adapter.weights["fp32"] - plain.weights["fp32"] == sum(t.numel() * 4 for t in file.values())
    assert with_adapter.trained == plain.trained


# The render stage's defaults for each run: Z-Image set to Turbo (9 steps, guidance 0), SDXL's own (30, 6).
# (SDXL renders 4 steps here: its own defaults are tested in test_variant.py.)
RENDERED = {"zimage": ({"variant": "turbo"}, {}, ("turbo", 9, 0.0)), "sdxl": ({}, {"steps": 4}, ("base", 4, 6.0))}


def test_live_samples_and_the_final_render_leave_the_adapter_out(trained, tmp_path):
    """The render stage renders the saved LoRA on the plain base exactly as <Pipeline> + load_lora_weights does,
    at the variant's default steps and guidance; a live sample (adapter off) is the same image, and with the
    adapter on the image differs. The adapter is back on, frozen, after the live sample."""
    import diffusers

    from tuneline.models.family import get_family
    from tuneline.models.ref import resolve_model
    from tuneline.models.training_adapter import training_adapter_off
    from tuneline.stages.render.generate import pipeline_from_training
    from tuneline.stages.render.stage import run as run_render

    family = trained["family"]
    model, render, (variant, steps, guidance) = RENDERED[family]
    project = Project(tmp_path)
    (project.root / "prompts.yaml").write_text(yaml.safe_dump([{"prompt": "alf, a red thing", "seed": 3}]), "utf-8")
    params = project.params(model={"base": f"tiny-{family}", "training_adapter": f"tiny-{family}-training-adapter",
                                   **model},
                            render={"height": 32, "width": 32, "sheet_tile": 32, "transfer": False,
                                    "diagnostics": False, **render})
    shutil.copytree(trained["run"] / "adapted" / "out", project.root / "models/train")
    report = run_render(params, project.root, project.root / "models/train", project.root / "renders",
                        project.root / "metrics")
    assert (report.extra["variant"], report.extra["default_steps"], report.extra["default_guidance_scale"]) == \
        (variant, steps, guidance)
    with Image.open(project.root / "renders/final/0.png") as final:
        final_pixels = np.asarray(final, dtype=np.int16)

    def draw(pipeline):
        image = pipeline("alf, a red thing", height=32, width=32, num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator("cpu").manual_seed(3)).images[0]
        return np.asarray(image, dtype=np.int16)

    plain = getattr(diffusers, get_family(family).render.pipeline).from_pretrained(resolve_model(f"tiny-{family}"))
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(project.root / "models/train", weight_name=LORA_FILE)
    assert np.array_equal(draw(plain), final_pixels)

    adapted = trained["adapted"]
    live = pipeline_from_training(adapted.adapter, adapted.modules)
    denoiser = denoiser_of(adapted, family)
    with torch.inference_mode(), training_adapter_off(live.components.values()):
        assert denoiser.active_adapters() == ["default"]
        live_pixels = draw(live)
    print(f"{family}: live sample vs final render: max difference {np.abs(live_pixels - final_pixels).max()}")
    assert np.array_equal(live_pixels, final_pixels)  # the same model: the trained LoRA on the plain base
    with torch.inference_mode():
        assert np.abs(draw(live) - final_pixels).mean() > 0.5  # the adapter on: another model
    assert denoiser.active_adapters() == ["default", "training_adapter"]
    assert not any(p.requires_grad for p in adapter_tensors(denoiser).values())
    assert all(p.requires_grad for n, p in denoiser.named_parameters() if ".default." in n)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_exact_with_a_training_adapter(request, family, tmp_path):
    """Stopped at step 1 and resumed: the same step-2 checkpoint as a straight run (EMA on, live samples at every
    step with the adapter switched off while they render); the adapter is reloaded from its file, never saved."""
    from tuneline.train.trainer import StopRequested

    project = request.getfixturevalue(PROJECTS[family])
    params = adapter_params(project, ema={"enabled": True, "decay": 0.9}, lora={"dropout": 0.1})
    straight = make_trainer(project, tmp_path / "a", params, live_every=1)
    base = straight.trained_weights()
    straight.fit()
    assert sorted(p.name for p in (straight.checkpoint_dir / "live").iterdir()) == ["step_000001", "step_000002"]

    def stop_at_one(state, result, seconds):
        os.kill(os.getpid(), signal.SIGTERM)

    halves = make_trainer(project, tmp_path / "b", params, live_every=1)
    with pytest.raises(StopRequested):
        halves.fit(on_log=stop_at_one)
    resumed = make_trainer(project, tmp_path / "b", params, live_every=1)
    assert resumed.state.step == 1 and resumed.run_key == straight.run_key
    resumed.fit()
    [a] = (tmp_path / "a/checkpoints").glob("*/step_000002")
    [b] = (tmp_path / "b/checkpoints").glob("*/step_000002")
    assert_resumed_exactly(a, b, base, resumed_at=1, ema=True)
    assert not any("training_adapter" in key for key in load_file(a / "trained.safetensors"))
    ema = torch.load(a / "training.pt", weights_only=True)["ema"]["shadow"]
    assert not any("training_adapter" in key for key in ema)


def test_the_adapter_file_is_part_of_the_run_key_and_of_models_identity(latents_project, tmp_path):
    from tuneline.models.training_adapter import identity_entry
    from tuneline.stages.models.stage import read_identity
    from tuneline.stages.models.stage import run as run_models
    from tuneline.stages.train.stage import build_trainer
    from tuneline.tiny import tiny_training_adapter_file

    from accelerate.state import AcceleratorState

    project = latents_project
    file = tmp_path / "adapter.safetensors"
    shutil.copy(tiny_training_adapter_file("tiny-sdxl-training-adapter"), file)

    def run_key(params) -> str:
        AcceleratorState._reset_state(True)
        trainer = build_trainer(params, project.root, project.root / "data/latents", tmp_path / "checkpoints")
        trainer._start()  # the run key, the seed: nothing loaded
        return trainer.run_key

    params = adapter_params(project, str(file))
    first, entry = run_key(params), identity_entry(params.model, project.root)
    assert first == run_key(params) and entry["model.training_adapter"]["kind"] == "local"
    first_report = run_models(params, project.root, tmp_path / "identity")  # recorded beside model.base
    assert (first_report.computed, first_report.warnings) == (2, [])  # a first identification changed nothing
    recorded = read_identity(tmp_path / "identity")
    assert recorded["model.training_adapter"] == entry["model.training_adapter"] and "model.base" in recorded
    assert first != run_key(train_params(project))  # with and without an adapter
    assert first != run_key(adapter_params(project, {"ref": str(file), "scale": 0.5}))
    tensors = load_file(file)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key] * 2
    file.unlink()
    save_file(tensors, file)  # the same path, other weights: another run
    assert run_key(params) != first
    assert identity_entry(params.model, project.root) != entry
    # The models stage warns when, and only when, an identity changed, and names it.
    changed = run_models(params, project.root, tmp_path / "identity")
    assert changed.computed == 2
    assert changed.warnings == ["model identity changed (model.training_adapter): stages that use it will rerun"]
    again = run_models(params, project.root, tmp_path / "identity")
    assert (again.computed, again.reused, again.warnings) == (0, 2, [])


def test_bad_training_adapter_settings_are_refused_before_any_compute(latents_project, tmp_path):
    from tuneline.core.params import ParamsError
    from tuneline.models.training_adapter import adapter_identity, identity_entry, resolve_source
    from tuneline.preflight import preflight

    project = latents_project

    def refused(adapter, match: str, **train) -> None:
        with pytest.raises(ParamsError, match=match):
            preflight(adapter_params(project, adapter, **train), project.root, ("check",))

    hub = "ostris/zimage_turbo_training_adapter"
    refused(hub, r"model\.training_adapter\.weight_name.*model\.training_adapter\.revision")
    refused({"ref": hub, "weight_name": "a.safetensors"}, r"model\.training_adapter\.revision: None.*40 hex")
    refused({"ref": hub, "weight_name": "a.safetensors", "revision": "main"}, r"revision: 'main'")
    refused({"ref": hub, "weight_name": "a.bin", "revision": HUB_COMMIT},
            r"weight_name: 'a\.bin' is not a \.safetensors")
    refused("adapters/missing.safetensors", r"model\.training_adapter\.ref: 'adapters/missing\.safetensors' is not a")
    pickle = project.root / "adapter.pt"
    pickle.write_bytes(b"not a safetensors file")
    refused(str(pickle), r"not a \.safetensors file")
    refused("tiny-sdxl-training-adapter", r"train\.mode 'full'.*needs train\.mode lora", mode="full")
    # A pinned hub file is accepted without a download; its identity is id@revision/weight_name.
    pinned = adapter_params(project, {"ref": hub, "weight_name": "v2.safetensors", "revision": HUB_COMMIT})
    preflight(pinned, project.root, ("check",))
    source = resolve_source(pinned.model.training_adapter, project.root)
    assert (source.repo, source.revision, source.weight_name, source.local) == (hub, HUB_COMMIT, "v2.safetensors", None)
    other = adapter_params(project, {"ref": hub, "weight_name": "v1.safetensors", "revision": HUB_COMMIT})
    assert adapter_identity(pinned.model.training_adapter, project.root) != \
        adapter_identity(other.model.training_adapter, project.root)
    assert identity_entry(pinned.model, project.root)["model.training_adapter"]["kind"] == "hub"


def test_full_mode_with_an_adapter_is_refused_by_the_adapter_too(latents_project, tmp_path):
    from tuneline.core.params import ParamsError

    with pytest.raises(ParamsError, match="needs train.mode lora"):
        make_trainer(latents_project, tmp_path, adapter_params(latents_project, mode="full"))


# --- Turbo without an adapter: one warning, with the fix ----------------------------------------------

def test_training_turbo_without_an_adapter_warns_once_with_the_fix(zimage_project, tmp_path):  # noqa: F811
    from accelerate.state import AcceleratorState

    from tuneline.preflight import preflight
    from tuneline.stages.train.stage import run

    def distilled(warnings: list[str]) -> list[str]:
        return [w for w in warnings if "step-distilled" in w]

    params = adapter_params(zimage_project, None, variant="turbo", num_steps=1, checkpoint={"every_steps": 1})
    checked = distilled(preflight(params, zimage_project.root, ("check",)))
    assert len(checked) == 1 and "set model.training_adapter to a de-distilling LoRA" in checked[0]
    assert "Z-Image Base" in checked[0] and "musubi-tuner#769" in checked[0] and "(model.variant)" in checked[0]
    assert distilled(preflight(params, zimage_project.root, ("train",))) == []  # the train stage says it, once
    AcceleratorState._reset_state(True)
    report = run(params, zimage_project.root, zimage_project.root / "data/latents", tmp_path / "out",
                 checkpoint_dir=tmp_path / "checkpoints")
    assert distilled(report.warnings) == checked
    assert report.extra["variant"] == "turbo" and report.extra["training_adapter"] is None
    # With the adapter, or on the base variant: no warning.
    assert distilled(preflight(adapter_params(zimage_project, variant="turbo"), zimage_project.root, ("check",))) == []
    assert distilled(preflight(train_params(zimage_project), zimage_project.root, ("check",))) == []
    full = adapter_params(zimage_project, None, variant="turbo", mode="full")
    [note] = distilled(preflight(full, zimage_project.root, ("check",)))
    assert "train.mode full" in note and "Z-Image Base" in note


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_works_on_a_quantized_base(request, family, tmp_path):
    """model.quantize with model.training_adapter: the adapter sits on the quantized layers (PEFT's
    torchao / bitsandbytes LoRA layers), frozen and active; training changes the trained LoRA alone and
    the saved LoRA has the keys of a run without the adapter."""
    from tuneline.models.quantize import QuantizedLayer

    project = request.getfixturevalue(PROJECTS[family])
    params = adapter_params(project)
    params = params.model_copy(update={"model": params.model.model_copy(update={"quantize": "nf4"})})
    trainer = make_trainer(project, tmp_path / "run", params)
    denoiser = denoiser_of(trainer, family)
    quantized = [m for m in denoiser.modules() if isinstance(m, QuantizedLayer)]
    loaded = adapter_tensors(denoiser)
    assert quantized and loaded and not any(p.requires_grad for p in loaded.values())
    assert denoiser.active_adapters() == ["default", "training_adapter"]
    before = {name: p.detach().clone() for name, p in loaded.items()}
    start = trainer.trained_weights()
    summary = trainer.fit()
    assert np.isfinite(summary["final_loss"])
    assert_same_tensors(before, {name: p.detach() for name, p in adapter_tensors(denoiser).items()}, "training adapter")
    assert any(not torch.equal(start[name], value) for name, value in trainer.trained_weights().items())
    trainer.save_outputs(tmp_path / "out")
    saved = load_file(tmp_path / "out" / LORA_FILE)
    assert saved and not any("training_adapter" in key for key in saved)
    assert len(saved) == len(trainer.trained_weights())  # one saved tensor per trained LoRA tensor, nothing else
