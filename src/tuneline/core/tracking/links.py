"""Addresses of MLflow pages that open in MLflow's model-training view.

MLflow 3.17's UI (the pinned one; read in mlflow/server/js/build) picks its view from the address's
`workflowType` parameter, else from the last choice made with the sidebar's GenAI / Model training
switch (browser storage), else GenAI. The experiment's `mlflow.experimentKind` tag, which the tracker
sets, does not decide it in 3.17. An experiment page without a tab opens the runs list only with
`workflowType=machine_learning`, so every address tuneline prints or writes names the runs list or the
run page and carries that parameter. Clicks inside the UI (the experiments list, breadcrumbs) drop
it: there the sidebar's switch, set once to "Model training", is what keeps the view.

No mlflow import here: building an address is string work.
"""

from __future__ import annotations

from urllib.parse import quote

from tuneline.core.tracking.config import TrackingConfig

ML_VIEW = "workflowType=machine_learning"
# Where `tuneline ui` serves the MLflow UI of a local store (its --mlflow-port default).
DEFAULT_UI = "http://127.0.0.1:5000"


def ui_base(config: TrackingConfig, port: int | None = None) -> str:
    """The MLflow UI's address: the tracking server itself, or `tuneline ui`'s for a local store."""
    uri = config.tracking_uri
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return DEFAULT_UI if port is None else f"http://127.0.0.1:{port}"


def experiments_url(base: str) -> str:
    return f"{base.rstrip('/')}/#/experiments?{ML_VIEW}"


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs list (not its GenAI overview)."""
    return f"{base.rstrip('/')}/#/experiments/{quote(str(experiment_id))}/runs?{ML_VIEW}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page."""
    return f"{base.rstrip('/')}/#/experiments/{quote(str(experiment_id))}/runs/{quote(str(run_id))}?{ML_VIEW}"


def artifact_url(base: str, experiment_id: str, run_id: str, path: str) -> str:
    """A run's artifact, opened in the run's artifact view (e.g. export/model_card.html)."""
    return (f"{base.rstrip('/')}/#/experiments/{quote(str(experiment_id))}/runs/{quote(str(run_id))}"
            f"/artifacts/{quote(path)}?{ML_VIEW}")
