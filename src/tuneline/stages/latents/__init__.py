"""Stage `latents`."""

# The modules that decide what an item's stored result is (tuneline.core.codeversion). The
# VAE's and text encoders' weights count through their identity (tuneline.models.ref).
CODE = ("stages/latents/stage.py", "models/loading.py", "models/sdxl/text.py", "models/zimage/text.py",
        "models/family.py", "models/single_file.py", "models/ref.py", "models/base.py", "core/device.py")
