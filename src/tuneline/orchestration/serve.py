"""Serve the pipeline as a Prefect deployment: start runs from the UI's parameter form,
watch them, cancel them (the running stage gets SIGTERM and training saves a checkpoint).

    tuneline ui                       # MLflow UI + Prefect server (another terminal)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve             # or: tuneline serve

The form's `overrides` field is params.yaml's schema with every field optional (the same
pydantic models and descriptions as tuneline.config): empty fields keep params.yaml.
"""

from __future__ import annotations

import argparse
import os
import urllib.request
from pathlib import Path

DEFAULT_NAME = "tuneline"
LOCAL_SERVER = "http://127.0.0.1:4200/api"


def _local_server_answers(url: str = LOCAL_SERVER) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def deployment(name: str = DEFAULT_NAME, root: str = ".", params_path: str = "params.yaml"):
    """The RunnerDeployment that `main` serves (its parameter_openapi_schema is the UI form)."""
    from tuneline.orchestration.flow import pipeline

    return pipeline.to_deployment(
        name=name,
        parameters={"params_path": params_path, "root": str(Path(root).resolve())},
        description="tuneline: ingest -> bucket -> caption -> latents -> train -> render -> export, cached per stage.",
        tags=["tuneline"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default: {DEFAULT_NAME})")
    parser.add_argument("--root", default=".", help="project root (default: .)")
    parser.add_argument("--params", default="params.yaml", help="params file, relative to the root (default: params.yaml)")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        if _local_server_answers():
            os.environ["PREFECT_API_URL"] = LOCAL_SERVER  # before Prefect reads its settings
            print(f"using the Prefect server at {LOCAL_SERVER}", flush=True)
        else:
            print("PREFECT_API_URL is not set and no server answers on 127.0.0.1:4200: serving against a temporary "
                  "server that no UI shows. Start `tuneline ui` and export PREFECT_API_URL="
                  f"{LOCAL_SERVER}.", flush=True)
    from prefect import serve

    serve(deployment(args.name, args.root, args.params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
