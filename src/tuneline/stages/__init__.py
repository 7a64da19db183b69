"""The pipeline's stages, one package each, one shape: `config.py` (the stage's params
section), `stage.py` (`run(params, root, ...) -> StageReport`) and the stage's own helpers.

Importing a stage package or its config is instant: torch, diffusers and mlflow load inside
the functions that need them. The order of the stages and how each is run are in
`tuneline.orchestration.registry`.
"""
