"""What every stage uses and what uses no stage: the params root's base (`params`), the
project's folder layout (`layout`), the content-addressed item store (`store`), manifests,
atomic file writes (`fsutil`), image reading and PNG writing, worker pools, the stage report,
and MLflow tracking. Nothing here imports a stage, torch, diffusers or mlflow at import time.
"""
