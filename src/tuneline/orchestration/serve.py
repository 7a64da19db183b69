"""Serve the pipeline as a Prefect deployment: start runs from the UI's parameter form,
watch them, cancel them (the running stage gets SIGTERM and training saves a checkpoint).

    tuneline ui                       # MLflow UI + Prefect server (another terminal)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve             # or: tuneline serve

The form's `overrides` field is params.yaml's schema with every field optional (the same
pydantic models, descriptions and limits as tuneline.config): empty fields keep params.yaml, and
Prefect refuses a value out of a field's limits before the run starts.

If the server stops answering (`tuneline ui` stopped), serve says so in one line and exits
with status 1 within a few seconds, instead of retrying with tracebacks for a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

DEFAULT_NAME = "tuneline"
LOCAL_SERVER = "http://127.0.0.1:4200/api"
HEALTH_POLL_S = 1.0
# A refused connection means nothing listens any more: give up after this long.
REFUSED_FOR_S = 3.0
# No answer at all (a server too busy to answer /health) is given much longer.
SILENT_FOR_S = 30.0


def _health(url: str, timeout_s: float = 2.0) -> str:
    """GET <url>/health: "ok" (200), "answers" (another HTTP status: up, but wants a key or such),
    "refused" (nothing listens at that address) or "silent" (no answer in time)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return "ok" if response.status == 200 else "answers"
    except urllib.error.HTTPError:
        return "answers"
    except urllib.error.URLError as error:
        reason = error.reason
        refused = isinstance(reason, ConnectionRefusedError) or getattr(reason, "errno", None) == errno.ECONNREFUSED
        return "refused" if refused else "silent"
    except (ConnectionError, OSError, ValueError):
        return "silent"


def _local_server_answers(url: str = LOCAL_SERVER) -> bool:
    return _health(url) == "ok"


async def _until_server_lost(api_url: str, poll_s: float = HEALTH_POLL_S, refused_for_s: float = REFUSED_FOR_S,
                             silent_for_s: float = SILENT_FOR_S) -> bool:
    """Poll <api_url>/health; return once it has failed long enough. True if it ever answered."""
    answered = False
    failing_since: float | None = None
    while True:
        state = await asyncio.to_thread(_health, api_url)
        now = time.monotonic()
        if state in ("ok", "answers"):
            answered, failing_since = True, None
        else:
            failing_since = now if failing_since is None else failing_since
            if now - failing_since >= (refused_for_s if state == "refused" else silent_for_s):
                return answered
        await asyncio.sleep(poll_s)


def _quiet_prefect() -> None:
    """Prefect's services log a traceback per failed retry against a server that is gone; nothing
    they say during this shutdown is news."""
    logging.disable(logging.CRITICAL)
    logging.raiseExceptions = False  # Prefect's API log handler prints its failures unless this is off
    warnings.simplefilter("ignore")


async def _serve(runner, api_url: str | None) -> bool:
    """Run `runner` until it stops, or until the server at api_url is lost: then say so in one
    line, stop it without the API calls a normal shutdown makes, and return True."""
    serving = asyncio.create_task(runner.start())
    watching = asyncio.create_task(_until_server_lost(api_url)) if api_url else None
    try:
        await asyncio.wait([task for task in (serving, watching) if task], return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # its own error, if it had one
            return False
        answered = watching.result()
        _quiet_prefect()
        runner.pause_on_shutdown = False  # pausing the deployments needs the server
        # Said now, before a running flow run's own last words (its stage stopping) follow.
        print(f"the Prefect server at {api_url} {'stopped answering' if answered else 'does not answer'}; "
              "stopping serve", file=sys.stderr, flush=True)
        return True
    finally:
        # Cancelling start() is Prefect's own shutdown path (Ctrl-C does the same): its process
        # manager stops any flow run it started (SIGTERM, so a training stage saves a checkpoint).
        for task in (watching, serving):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(task for task in (watching, serving) if task), return_exceptions=True)


def deployment(name: str = DEFAULT_NAME, root: str = ".", params_path: str = "params.yaml"):
    """The RunnerDeployment that `main` serves (its parameter_openapi_schema is the UI form)."""
    from tuneline.orchestration.flow import pipeline

    served = pipeline.to_deployment(
        name=name,
        parameters={"params_path": params_path, "root": str(Path(root).resolve())},
        description="tuneline: ingest -> bucket -> caption -> latents -> train -> render -> export, cached per stage.",
        tags=["tuneline"],
    )
    _describe_current_values(served._parameter_openapi_schema, Path(root) / params_path)
    return served


def _describe_current_values(schema, params_file: Path) -> None:
    """Each form field's description ends with params.yaml's value when serve started (what an empty
    field keeps; a params.yaml edited later is what a run reads). None when params.yaml is not valid:
    a run then says what is wrong."""
    from tuneline.config import load_params
    from tuneline.core.params import ParamsError
    from tuneline.orchestration.overrides import with_current_values

    try:
        values = load_params(params_file).model_dump(mode="json")
    except (ParamsError, FileNotFoundError):
        return
    with_current_values({"definitions": schema.definitions}, values)


def main(argv: list[str] | None = None) -> int:
    # The docstring's first paragraph, whole (its first line alone stops mid-sentence).
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=" ".join(__doc__.split("\n\n")[0].split()))
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
    from prefect.runner import Runner
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url  # None: Prefect's temporary server, nothing to watch
    if api_url and _health(api_url) == "refused":
        print(f"the Prefect server at {api_url} does not answer; start it (`tuneline ui`) or fix PREFECT_API_URL",
              file=sys.stderr, flush=True)
        return 1
    served = deployment(args.name, args.root, args.params)
    runner = Runner(pause_on_shutdown=True, limit=None)  # what prefect.serve builds
    runner.add_deployment(served)
    try:
        from prefect.flows import _display_serve_start_message
    except ImportError:
        print(f"serving {served.flow_name}/{served.name}", flush=True)
    else:
        _display_serve_start_message(served)
    try:
        lost = asyncio.run(_serve(runner, api_url))
    except KeyboardInterrupt:
        print("serve stopped", flush=True)
        return 0
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
