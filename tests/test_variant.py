"""model.variant: the release of its family model.base is (Z-Image base or turbo; SDXL base only), set or read
from what the model says about itself, and the render defaults it decides (Turbo 9 steps / guidance 0, Base
50 / 4, SDXL unchanged). Nothing here loads a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuneline.core.params import ParamsError


def zimage_model(base: str, **settings):
    from tuneline.models.config import ModelConfig

    return ModelConfig(base=base, family="zimage", **settings)


def resolve(model, root: Path | None = None, family: str = "zimage"):
    from tuneline.models.family import FAMILIES
    from tuneline.models.variant import resolve_variant

    return resolve_variant(model, FAMILIES[family], root)


def test_render_defaults_per_variant_and_sdxl_unchanged(tmp_path):
    from tuneline.models.config import ModelConfig
    from tuneline.models.family import FAMILIES
    from tuneline.stages.render.config import RenderConfig
    from tuneline.stages.render.prompts import load_prompts
    from tuneline.stages.render.stage import render_defaults

    turbo, base = resolve(zimage_model("tiny-zimage", variant="turbo")), resolve(zimage_model("tiny-zimage"))
    assert (turbo.variant.name, turbo.steps, turbo.guidance_scale, turbo.variant.distilled) == ("turbo", 9, 0.0, True)
    assert (base.variant.name, base.steps, base.guidance_scale, base.variant.distilled) == ("base", 50, 4.0, False)
    assert "Z-Image-Turbo model card" in turbo.variant.source and "Tongyi-MAI/Z-Image model card" in base.variant.source
    assert not base.detected and "the default, base" in base.reason  # tiny-zimage names no variant
    sdxl = resolve(ModelConfig(base="tiny-sdxl"), family="sdxl")
    assert (sdxl.variant.name, sdxl.steps, sdxl.guidance_scale) == ("base", 30, 6.0)
    with pytest.raises(ParamsError, match=r"model.variant: 'turbo' is not a SDXL variant; allowed: base"):
        resolve(ModelConfig(base="tiny-sdxl", variant="turbo"), family="sdxl")

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(["a", {"prompt": "b", "steps": 3, "guidance_scale": 2.5}]), "utf-8")
    config = RenderConfig(height=32, width=48)
    first, second = load_prompts(path, config, FAMILIES["zimage"], turbo.variant)
    assert (first.steps, first.guidance_scale, second.steps, second.guidance_scale) == (9, 0.0, 3, 2.5)
    first = load_prompts(path, config, FAMILIES["zimage"], base.variant)[0]
    assert (first.steps, first.guidance_scale) == (50, 4.0)
    first = load_prompts(path, config, FAMILIES["sdxl"], sdxl.variant)[0]
    assert (first.steps, first.guidance_scale) == (30, 6.0)
    set_steps = RenderConfig(height=32, width=48, steps=4)
    first = load_prompts(path, set_steps, FAMILIES["zimage"], turbo.variant)[0]
    assert (first.steps, first.guidance_scale) == (4, 0.0)  # render.steps wins, guidance still Turbo's

    report = render_defaults(turbo, set_steps)
    assert (report["variant"], report["default_steps"], report["default_guidance_scale"]) == ("turbo", 4, 0.0)
    assert report["defaults_from"].startswith("steps: render.steps; guidance_scale: variant turbo: Tongyi-MAI/")
    assert report["variant_decided_by"] == "model.variant"


@pytest.mark.parametrize("base, variant, detected, where", [
    ("Tongyi-MAI/Z-Image-Turbo", "turbo", True, "hub id"),
    ("Tongyi-MAI/Z-Image", "base", False, "not detected"),
    ("ostris/Z-Image-De-Turbo", "base", True, "hub id"),  # "de-turbo" is longer than "turbo": de-distilled
    ("someone/zimage_deturbo_v1", "base", True, "hub id"),
    ("someone/zimage-turbo-dedistilled", "base", True, "hub id"),
])
def test_the_variant_is_read_from_the_hub_id(base, variant, detected, where, tmp_path):
    choice = resolve(zimage_model(base), tmp_path)  # no model card in the (empty) HF cache: never downloaded
    assert (choice.variant.name, choice.detected) == (variant, detected)
    assert where in choice.reason


def _folder(path: Path, card: str | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}', "utf-8")
    if card is not None:
        (path / "README.md").write_text(card, "utf-8")
    return path


def test_the_variant_is_read_from_the_folder_the_cache_path_the_file_and_the_model_card(tmp_path):
    from tuneline.models.family import FAMILIES
    from tuneline.models.variant import undetected_warning

    turbo_folder = _folder(tmp_path / "weights/Z-Image-Turbo")
    assert resolve(zimage_model(str(turbo_folder))).variant.name == "turbo"
    snapshot = _folder(tmp_path / "hub/models--Tongyi-MAI--Z-Image-Turbo/snapshots/0123abcd")
    choice = resolve(zimage_model(str(snapshot)))
    assert choice.variant.name == "turbo" and "hub cache folder 'Tongyi-MAI/Z-Image-Turbo'" in choice.reason
    single = tmp_path / "z_image_turbo_bf16.safetensors"
    single.write_bytes(b"")
    assert "file name" in resolve(zimage_model(str(single))).reason
    # A fine-tune in a neutral folder: its model card says what it was made from.
    card = "---\nlicense: apache-2.0\nbase_model: Tongyi-MAI/Z-Image-Turbo\ntags: [lora]\n---\n\n# My portraits\n"
    finetune = _folder(tmp_path / "my-portraits", card)
    choice = resolve(zimage_model(str(finetune)))
    assert choice.variant.name == "turbo" and "model card" in choice.reason
    # A de-distilled one says so in its title: the longer marker wins over its base_model's "turbo".
    card = "---\nbase_model: Tongyi-MAI/Z-Image-Turbo\n---\n<h1 align=\"center\">My Z-Image De-Turbo</h1>\nbody\n"
    assert resolve(zimage_model(str(_folder(tmp_path / "dt", card)))).variant.name == "base"
    # model.variant wins over what the model says.
    choice = resolve(zimage_model(str(turbo_folder), variant="base"))
    assert (choice.variant.name, choice.reason, choice.steps) == ("base", "model.variant", 50)
    # Nothing names it: base, and `tuneline check` says so (a tiny model's id aside).
    plain = _folder(tmp_path / "zimage", "# Z-Image\n")
    model = zimage_model(str(plain))
    choice = resolve(model)
    assert (choice.variant.name, choice.detected) == ("base", False)
    warning = undetected_warning(choice, model, FAMILIES["zimage"])
    assert warning and "model.variant (turbo)" in warning and "50 steps, guidance 4.0" in warning
    assert undetected_warning(resolve(zimage_model("tiny-zimage")), zimage_model("tiny-zimage"),
                              FAMILIES["zimage"]) is None


def test_a_variant_the_family_lacks_is_refused_before_any_stage(project):
    from tuneline.preflight import family_problems

    params = project.params(model={"base": "tiny-sdxl", "variant": "turbo"})
    problems = family_problems(params, project.root)
    assert problems == ["model.variant: 'turbo' is not a SDXL variant; allowed: base (or null to detect it from the "
                        "model)"]
    assert family_problems(project.params(model={"base": "tiny-zimage", "variant": "turbo"}), project.root) == []
