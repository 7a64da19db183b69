"""Stage `train`."""

# The modules that decide the trained result (tuneline.core.codeversion); dvc.yaml declares them.
CODE = ("stages/train/stage.py", "stages/train/plot.py", "train", "models/registry.py", "models/family.py",
        "models/sdxl/adapter.py", "models/loading.py", "models/sdxl/text.py", "models/zimage/adapter.py", "models/zimage/text.py",
        "models/single_file.py", "models/ref.py", "stages/render/generate.py",
        "stages/render/prompts.py", "stages/render/samplers.py", "core/tensorfile.py", "models/base.py", "core/device.py")
