"""export.vae: the pipeline's VAE as one standalone file in the layout ComfyUI's Load VAE node reads.

The reference below restates what ComfyUI does with such a file, read from its source at
github.com/Comfy-Org/ComfyUI commit a125cd84b054a57729b5eecab930ca9408719832 (2025-10-12):

- nodes.py VAELoader.load_vae: `comfy.utils.load_torch_file(path)` then `comfy.sd.VAE(sd=sd)`, the keys
  as they are in the file (no prefix stripped: a `first_stage_model.` key would not be found).
- comfy/sd.py VAE.__init__: the branch is chosen from marker keys; an SD/SDXL VAE in the ldm layout takes
  the `"decoder.conv_in.weight" in sd` branch with a fixed ddconfig (ch 128, ch_mult [1, 2, 4, 4],
  num_res_blocks 2), z_channels from decoder.conv_in, and `post_quant_conv.weight` makes it an
  AutoencoderKL with embed_dim from that tensor. A diffusers-layout file is recognised by
  `decoder.up_blocks.0.resnets.0.norm1.weight` and converted (comfy/diffusers_convert.py); ours must not
  need that.
- comfy/ldm/modules/diffusionmodules/model.py Encoder / Decoder / ResnetBlock / AttnBlock / Down- and
  Upsample, and comfy/ldm/models/autoencoder.py AutoencodingEngineLegacy (quant_conv, post_quant_conv):
  the module tree, hence the key names and shapes; the mid attention's q/k/v/proj_out are Conv2d 1x1,
  weights [C, C, 1, 1] (diffusers_convert reshapes diffusers' Linear weights to that too).

Outside this test, real ComfyUI (that commit, CPU) loaded the exported file of a full SDXL-size VAE with no
missing or leftover keys and decoded like diffusers; the tiny VAE cannot go through comfy.sd.VAE, whose
ddconfig is fixed to SDXL's sizes, so here the same layout rules are checked for both sizes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import train_params

# --- the ComfyUI reference ----------------------------------------------------------------------

# comfy/sd.py: "default SD1.x/SD2.x VAE parameters" (SDXL's VAE has the same sizes)
COMFY_SD_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                     "dropout": 0.0}
# Marker keys of the branches comfy/sd.py tries before the SD one (video decoder, TAESD, Stable Cascade).
COMFY_EARLIER_MARKERS = ("decoder.mid.block_1.mix_factor", "taesd_decoder.1.weight", "vquantizer.codebook.weight",
                         "backbone.1.0.block.0.1.num_batches_tracked", "blocks.11.num_batches_tracked",
                         "encoder.backbone.1.0.block.0.1.num_batches_tracked")
COMFY_DIFFUSERS_MARKER = "decoder.up_blocks.0.resnets.0.norm1.weight"


def comfyui_detect(sd: dict) -> tuple[str, dict, int | None]:
    """(model class, ddconfig, embed_dim) that comfy.sd.VAE.__init__ picks for `sd` (config=None)."""
    assert COMFY_DIFFUSERS_MARKER not in sd, "diffusers layout: ComfyUI would convert it first"
    hits = [key for key in COMFY_EARLIER_MARKERS if key in sd]
    assert not hits, f"ComfyUI would take another branch: {hits}"
    assert "decoder.conv_in.weight" in sd, "no SD VAE marker: 'WARNING: No VAE weights detected'"
    z_channels = sd["decoder.conv_in.weight"].shape[1]
    assert z_channels not in (64, 32), "ComfyUI would load it as a HunyuanVideo/Image VAE"
    ddconfig = dict(COMFY_SD_DDCONFIG)
    if "encoder.down.2.downsample.conv.weight" not in sd and "decoder.up.3.upsample.conv.weight" not in sd:
        ddconfig["ch_mult"] = [1, 2, 4]  # the SD x4 upscaler's VAE (downscale 4)
    ddconfig["z_channels"] = z_channels
    if "post_quant_conv.weight" in sd:
        return "AutoencoderKL", ddconfig, sd["post_quant_conv.weight"].shape[1]
    return "AutoencodingEngine", ddconfig, None


def comfyui_layout(ddconfig: dict, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape of ComfyUI's AutoencoderKL(ddconfig, embed_dim) (no temb: temb_ch = 0)."""
    ch, mult, blocks, z = ddconfig["ch"], ddconfig["ch_mult"], ddconfig["num_res_blocks"], ddconfig["z_channels"]
    out: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(name, c):
        resnet(f"{name}.mid.block_1", c, c), resnet(f"{name}.mid.block_2", c, c)
        norm(f"{name}.mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.mid.attn_1.{part}", c, c, 1)  # AttnBlock: Conv2d 1x1

    conv("encoder.conv_in", ch, ddconfig["in_channels"], 3)
    block_in = ch
    for level, factor in enumerate(mult):
        for i in range(blocks):
            resnet(f"encoder.down.{level}.block.{i}", block_in, ch * factor)
            block_in = ch * factor
        if level != len(mult) - 1:
            conv(f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", 2 * z if ddconfig["double_z"] else z, block_in, 3)

    block_in = ch * mult[-1]
    conv("decoder.conv_in", block_in, z, 3)
    mid("decoder", block_in)
    for level in reversed(range(len(mult))):
        for i in range(blocks + 1):
            resnet(f"decoder.up.{level}.block.{i}", block_in, ch * mult[level])
            block_in = ch * mult[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", ddconfig["out_ch"], block_in, 3)

    conv("quant_conv", 2 * embed_dim, 2 * z, 1)
    conv("post_quant_conv", z, embed_dim, 1)
    return out


def ddconfig_of(vae_config: dict) -> dict:
    """ComfyUI's ddconfig for a diffusers AutoencoderKL config (what ComfyUI's fixed one is for SDXL)."""
    ch = vae_config["block_out_channels"][0]
    return {**COMFY_SD_DDCONFIG, "ch": ch, "ch_mult": [c // ch for c in vae_config["block_out_channels"]],
            "num_res_blocks": vae_config["layers_per_block"], "z_channels": vae_config["latent_channels"],
            "in_channels": vae_config["in_channels"], "out_ch": vae_config["out_channels"]}


def shapes(sd: dict) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in sd.items()}


# sdxl-vae (stabilityai/sdxl-vae config.json)
SDXL_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                       up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                       layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024,
                       scaling_factor=0.13025, force_upcast=True)


# --- (a) the layout ComfyUI's loader expects --------------------------------------------------------

def test_full_size_sdxl_vae_is_exactly_what_comfyui_builds_for_it():
    from diffusers import AutoencoderKL

    from tuneline.models.export import vae_single_file_state_dict

    with torch.device("meta"):  # shapes only: the full SDXL VAE without 335 MB of weights
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    sd = vae_single_file_state_dict(vae.state_dict(), dict(vae.config))
    kind, ddconfig, embed_dim = comfyui_detect(sd)
    assert (kind, ddconfig, embed_dim) == ("AutoencoderKL", COMFY_SD_DDCONFIG, 4)
    assert ddconfig == ddconfig_of(SDXL_VAE_CONFIG)
    assert shapes(sd) == comfyui_layout(ddconfig, embed_dim)  # no missing, no leftover key, every shape
    assert sd["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert not any(key.startswith("first_stage_model.") for key in sd)


def test_tiny_vae_file_has_comfyui_layout_and_diffusers_reads_it_back_exactly(tmp_path):
    from diffusers import AutoencoderKL

    from tuneline.models.ref import resolve_model
    from tuneline.models.export import vae_to_single_file

    tiny = resolve_model("tiny-sdxl")
    vae = AutoencoderKL.from_pretrained(tiny, subfolder="vae").eval()
    path = vae_to_single_file(vae.state_dict(), dict(vae.config), tmp_path / "vae.safetensors", "fp32",
                              {"modelspec.title": "t"})
    sd = load_file(path)
    kind, _, embed_dim = comfyui_detect(sd)
    assert (kind, embed_dim) == ("AutoencoderKL", 4)
    assert shapes(sd) == comfyui_layout(ddconfig_of(dict(vae.config)), embed_dim)
    # (b) diffusers' single-file loader gives the same weights back, and decodes the same
    loaded = AutoencoderKL.from_single_file(str(path), config=str(tiny), subfolder="vae",
                                            local_files_only=True).eval()
    original = vae.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    assert all(torch.equal(value, original[key]) for key, value in loaded.state_dict().items())
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.decode(latent).sample, vae.decode(latent).sample)


# --- (c) the stage --------------------------------------------------------------------------------

class Tracker:
    active = True

    def __init__(self):
        self.artifacts = []

    def set_tags(self, tags):
        pass

    def log_artifact(self, path, folder):
        self.artifacts.append(f"{folder}/{path.name}")


@pytest.fixture(scope="module")
def lora_run(latents_project, tmp_path_factory):
    from accelerate.state import AcceleratorState

    from tuneline.stages.train.stage import run as run_train

    run = tmp_path_factory.mktemp("vae-export")
    params = train_params(latents_project, lora={"rank": 4, "alpha": 2.0})
    AcceleratorState._reset_state(True)
    run_train(params, latents_project.root, latents_project.root / "data/latents", run / "models/train",
              checkpoint_dir=run / "checkpoints")
    return params, run


def export(latents_project, run, params, out, tracker=None, model=None, **settings):
    from tuneline.config import validate_params
    from tuneline.stages.export.stage import run as run_export

    data = params.model_dump(mode="json")
    data["export"] = {"name": "demo", "samples": 0, **settings}
    data["model"] = {**data["model"], **(model or {})}
    params = validate_params(data)
    return run_export(params, latents_project.root, run / "models/train", run / "renders", run / out,
                      run / f"metrics-{out}", tracker=tracker)


def test_stage_writes_the_vae_only_when_asked_and_a_rerun_reuses_it(latents_project, lora_run):
    from diffusers import AutoencoderKL

    from tuneline.models.ref import resolve_model

    params, run = lora_run
    report = export(latents_project, run, params, "plain")
    assert sorted(p.name for p in (run / "plain").glob("*.safetensors")) == ["demo.safetensors"]
    assert not any("VAE" in warning for warning in report.warnings)

    tracker = Tracker()
    report = export(latents_project, run, params, "with-vae", tracker=tracker, vae=True, dtype="fp32")
    path = run / "with-vae/demo_vae.safetensors"
    assert report.extra["files"] == [str(run / "with-vae/demo.safetensors"), str(path)]
    assert (report.computed, report.reused) == (2, 0)  # other params: other headers (params digest), new files
    metrics = json.loads((run / "metrics-with-vae/export.json").read_text())
    assert metrics["items"] == 2
    assert metrics["bytes"] == sum(p.stat().st_size for p in (run / "with-vae").glob("*.safetensors"))
    assert "export/demo_vae.safetensors" in tracker.artifacts
    assert any("the base model's, unchanged" in warning for warning in report.warnings)
    card = (run / "with-vae/README.md").read_text()
    assert "- `demo_vae.safetensors`: single-file VAE (fp32" in card and "unchanged" in card
    assert "the VAE into `models/vae`" in card and "Use both" not in card
    base_vae = AutoencoderKL.from_pretrained(resolve_model("tiny-sdxl"), subfolder="vae").state_dict()
    with safe_open(path, "pt") as handle:
        header = handle.metadata()
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/vae"
    assert "modelspec.prediction_type" not in header and header["tuneline.vae"] == "base"
    with safe_open(run / "with-vae/demo.safetensors", "pt") as handle:
        lora_header = handle.metadata()
    assert "tuneline.companion_file" not in lora_header  # the VAE is no companion of the LoRA
    for key in ("tuneline.data_digest", "tuneline.params_digest", "tuneline.code_version"):
        assert header[key] == lora_header[key]
    assert shapes(load_file(path)) == comfyui_layout(ddconfig_of(json.loads(
        (resolve_model("tiny-sdxl") / "vae/config.json").read_text())), 4)
    assert sum(t.numel() for t in load_file(path).values()) == sum(t.numel() for t in base_vae.values())

    again = export(latents_project, run, params, "again", vae=True, dtype="fp32")
    assert (again.computed, again.reused) == (0, 2)
    assert (run / "again/demo_vae.safetensors").read_bytes() == path.read_bytes()


def test_stage_exports_the_fine_tuned_vae_of_model_vae(latents_project, lora_run):
    """model.vae as the stage runner sets it when the autoencoder stage ran: that VAE, in fp16, no warning."""
    from diffusers import AutoencoderKL

    from tuneline.models.ref import resolve_model

    params, run = lora_run
    tuned = AutoencoderKL.from_pretrained(resolve_model("tiny-sdxl"), subfolder="vae")
    with torch.no_grad():
        tuned.decoder.conv_out.weight.add_(0.5)  # stands for the autoencoder stage's fine-tune
    folder = latents_project.root / "models/autoencoder-test"
    shutil.rmtree(folder, ignore_errors=True)
    tuned.save_pretrained(folder)
    report = export(latents_project, run, params, "tuned", vae=True, model={"vae": "models/autoencoder-test"})
    assert not any("unchanged" in warning for warning in report.warnings)
    sd = load_file(run / "tuned/demo_vae.safetensors")
    assert sd["decoder.conv_out.weight"].dtype == torch.float16
    assert torch.equal(sd["decoder.conv_out.weight"], tuned.decoder.conv_out.weight.detach().half())
    assert torch.equal(sd["decoder.mid.attn_1.q.weight"][:, :, 0, 0],
                       tuned.decoder.mid_block.attentions[0].to_q.weight.detach().half())
    with safe_open(run / "tuned/demo_vae.safetensors", "pt") as handle:
        assert handle.metadata()["tuneline.vae"] == "models/autoencoder-test"
    assert "`models/autoencoder-test`" in (run / "tuned/README.md").read_text()
