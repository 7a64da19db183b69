"""Stage `render`: sample images from the base and the trained model, and sheets to judge them.

- prompts: the prompts file (YAML/JSON), validated with pydantic
- samplers: sampler names -> diffusers schedulers, and which a family takes (its render facts)
- generate: pipelines, rendering, and live evaluation during training
- sheets: the contact sheet (prompts x checkpoints) and the diagnostic sheet's grid
- transfer: image-to-image from one data set into another's trigger word
- stage: the stage function

What differs between model families comes from the family (tuneline.models.family): its render
facts (pipelines, samplers, defaults) and its renderer (live pipeline, trained scheduler settings,
diagnostic sheet). Importing this package is instant: torch and diffusers load inside the functions
that need them.
"""

from tuneline.models.family import FAMILIES

# The modules that decide a rendered image (tuneline.core.codeversion); dvc.yaml declares them. The
# families' renderers are loaded by name: each family lists its modules (Family.code["render"]).
CODE = ("stages/render/stage.py", "stages/render/generate.py", "stages/render/prompts.py",
        "stages/render/samplers.py", "stages/render/sheets.py", "stages/render/transfer.py",
        "stages/render/cache.py", "stages/render/embeds.py", "models/loading.py", "models/quantize.py", "models/single_file.py",
        "models/ref.py",
        "models/family.py", "models/base.py", "models/contracts.py", "core/device.py", "train/output.py", "train/units.py", "train/loss.py", "core/tensorfile.py",
        "models/variant.py", "models/training_adapter.py", "train/structure_loss.py", "models/lycoris.py", "train/prior.py",
        *(path for family in FAMILIES.values() for path in family.code.get("render", ())))
