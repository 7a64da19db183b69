"""The `tracking` params section (MLflow). Kept free of mlflow and torch so validating
params.yaml stays instant; the tracker itself lives in `tuneline.core.tracking.tracker`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tuneline.core.fsutil import ChosenReference
from tuneline.core.params import Section

_SQLITE = "sqlite:///"


def _has_scheme(uri: str) -> bool:
    # "C:/x" is not a scheme, but the project only supports POSIX paths anyway.
    return "://" in uri or uri.startswith(("file:", "databricks"))


class TrackingConfig(Section):
    """MLflow tracking: one parent run per pipeline run, one child run per stage."""

    enabled: bool = Field(True, description="Log stages and training to MLflow. false makes every tracker a no-op.")
    tracking_uri: ChosenReference = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI: a local SQLite file (a relative path is taken from the project "
        "root, so every stage uses one database wherever it runs) or a server such as http://host:5000.",
    )
    artifact_root: ChosenReference = Field(
        "mlartifacts",
        description="Where run artifacts (eval images, exported files) go: a folder relative to the project "
        "root, an absolute path, or a URI such as s3://bucket/prefix. Used when the experiment is created; "
        "an existing experiment keeps its own location.",
    )
    experiment: str = Field("tuneline", min_length=1, description="MLflow experiment name.")
    system_metrics: bool = Field(
        True,
        description="Sample CPU, memory, disk, network and (with nvidia-ml-py installed) every GPU "
        "into each run as system/* metrics, with MLflow's built-in monitor.",
    )
    system_metrics_interval_s: float = Field(
        10, gt=0, description="Seconds between system metric samples."
    )

    def resolved_tracking_uri(self, root: Path) -> str:
        """The tracking URI with a relative SQLite or plain file path made absolute under root."""
        uri = self.tracking_uri
        if uri.startswith(_SQLITE):
            path, sep, query = uri[len(_SQLITE):].partition("?")
            if path and path != ":memory:" and not Path(path).is_absolute():
                path = str((Path(root) / path).resolve())
            return f"{_SQLITE}{path}{sep}{query}"
        if not _has_scheme(uri):
            return (Path(root) / uri).resolve().as_uri()
        return uri

    def resolved_artifact_root(self, root: Path) -> str:
        """The artifact root as a URI; a plain path is taken relative to root."""
        if _has_scheme(self.artifact_root):
            return self.artifact_root
        return (Path(root) / self.artifact_root).resolve().as_uri()
