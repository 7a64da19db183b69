"""Prefect flows: the DVC pipeline's stages as tasks (`flows.pipeline`) and a served
deployment of it (`python -m flows.serve`). Run from the project root, like stages/."""
