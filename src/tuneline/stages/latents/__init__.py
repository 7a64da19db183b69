"""Stage `latents`."""

from tuneline.models.family import FAMILIES

# The modules that decide what an item's stored result is (tuneline.core.codeversion): every
# family's text cache among them. The VAE's and text encoders' weights count through their
# identity (tuneline.models.ref). The output folder and report (output.py) and the rule that
# switches the text cache on or off (tuneline.train.cached_text) decide no stored byte: not here.
CODE = ("stages/latents/stage.py", "stages/latents/keys.py", "stages/latents/vae.py", "stages/latents/text.py",
        "stages/latents/files.py", "models/loading.py", "models/quantize.py", "models/family.py",
        "models/single_file.py", "models/ref.py", "models/base.py", "models/contracts.py", "core/device.py",
        "core/tensorfile.py",
        *(path for family in FAMILIES.values() for path in family.code.get("latents", ())))
