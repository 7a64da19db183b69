"""Stage `train`."""

from tuneline.models.family import FAMILIES

# The modules that decide the trained result (tuneline.core.codeversion); dvc.yaml declares them. Each
# family's adapter and, for live samples, its renderer are loaded by name (Family.code).
CODE = ("stages/train/stage.py", "stages/train/plot.py", "train", "models/registry.py", "models/family.py",
        "models/loading.py", "models/quantize.py", "models/single_file.py", "models/ref.py", "stages/render/generate.py", "stages/render/embeds.py",
        "stages/render/prompts.py", "stages/render/samplers.py", "core/tensorfile.py", "core/split.py", "models/base.py", "models/contracts.py", "core/device.py",
        "models/variant.py", "models/training_adapter.py", "models/lycoris.py",
        *(path for family in FAMILIES.values() for part in ("train", "render") for path in family.code.get(part, ())))
