"""Local services and the DVC wrapper behind `tuneline ui` and `tuneline repro`.

`tuneline ui` starts the MLflow UI (on the tracking store of params.yaml) and a Prefect
server, each in its own process group, waits until both answer HTTP, prints their URLs,
and on Ctrl-C / SIGTERM stops both groups (SIGTERM, then SIGKILL after a grace period)
and waits for them: nothing is left running.

`tuneline repro [dvc args]` gives a `dvc repro` one MLflow parent run: start the parent,
export TUNELINE_PARENT_RUN_ID, run `dvc repro`, end the parent with FINISHED, FAILED or
KILLED. Every stage DVC runs becomes a child of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tuneline.orchestration.runner import _set_parent_death_signal, group_alive, stop_group

HOST = "127.0.0.1"


@dataclass
class Service:
    name: str
    command: list[str]
    url: str           # what a person opens
    health_url: str    # what answers 200 once it is up
    env: dict[str, str] = field(default_factory=dict)  # this service's own settings, over the shared ones
    process: subprocess.Popen | None = None

    def start(self, env: dict[str, str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"{self.name.lower()}.log", "ab")
        self.process = subprocess.Popen(
            self.command, env={**env, **self.env}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_set_parent_death_signal if sys.platform == "linux" else None,
        )
        log.close()  # the child holds its own descriptor

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as response:
                return 200 <= response.status < 300
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is not None and (self.process.poll() is None or group_alive(self.process.pid)):
            stop_group(self.process, grace_s)


def ui_services(params, root: Path, mlflow_port: int, prefect_port: int, host: str = HOST) -> list[Service]:
    services = []
    uri = params.tracking.resolved_tracking_uri(root)
    if not uri.startswith(("http://", "https://")):  # a tracking server is already its own UI
        services.append(Service(
            "MLflow",
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
             "--default-artifact-root", params.tracking.resolved_artifact_root(root),
             "--host", host, "--port", str(mlflow_port), "--workers", "1"],
            # MLflow 3's UI opens in its GenAI view (traces, "Evaluation runs") unless the address
            # asks for the model-training one (see tuneline.core.tracking.links).
            f"http://{host}:{mlflow_port}/#/experiments?workflowType=machine_learning",
            f"http://{host}:{mlflow_port}/health"))
    services.append(Service(
        "Prefect",
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(prefect_port)],
        f"http://{host}:{prefect_port}", f"http://{host}:{prefect_port}/api/health",
        env=prefect_server_env(host, prefect_port)))
    return services


def prefect_server_env(host: str, port: int) -> dict[str, str]:
    """Settings that tell a Prefect server (3.8) its own address. `--port` alone only binds the
    socket: the UI's API address (GET /ui-settings) is built from PREFECT_SERVER_API_HOST/PORT,
    which default to 4200, so a browser on another port would call :4200/api."""
    base = f"http://{host}:{port}"
    return {
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_UI_API_URL": f"{base}/api",  # beats a PREFECT_UI_API_URL of the user's
        "PREFECT_UI_URL": base,                      # links the server writes (automations, notifications)
    }


def run_ui(params, root: Path, mlflow_port: int = 5000, prefect_port: int = 4200,
           start_timeout_s: float = 180.0) -> int:
    """Start both UIs, print their URLs, serve until Ctrl-C or SIGTERM; stop both. Exit code 0/1."""
    root = Path(root).resolve()
    services = ui_services(params, root, mlflow_port, prefect_port)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": os.environ.get("DO_NOT_TRACK", "1"), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)  # the server must not try to talk to another one
    stop_requested: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    log_dir = root / ".tuneline" / "ui"
    code = 0
    try:
        for service in services:
            service.start(env, log_dir)
        print("starting " + " and ".join(s.name for s in services) + f" (logs in {log_dir}) ...", flush=True)
        deadline = time.monotonic() + start_timeout_s
        pending = list(services)
        while pending and not stop_requested:
            for service in list(pending):
                if service.exited():
                    print(f"{service.name} exited with status {service.process.returncode}; "
                          f"see {log_dir / (service.name.lower() + '.log')}", file=sys.stderr, flush=True)
                    return 1
                if service.healthy():
                    pending.remove(service)
                    print(f"{service.name} UI: {service.url}", flush=True)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                print(f"{names} did not answer within {start_timeout_s:.0f} s; see {log_dir}", file=sys.stderr,
                      flush=True)
                return 1
            time.sleep(0.3)
        if not stop_requested:
            prefect = services[-1]
            print(f"flows use this server with: export PREFECT_API_URL={prefect.url}/api", flush=True)
            print("Ctrl-C stops both.", flush=True)
        while not stop_requested:
            for service in services:
                if service.exited():
                    print(f"{service.name} exited with status {service.process.returncode}", file=sys.stderr,
                          flush=True)
                    code = 1
                    stop_requested.append(0)
                    break
            time.sleep(0.3)
    finally:
        # Signals that arrive while stopping are already being handled: keep ours installed.
        for service in services:
            service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("stopped " + " and ".join(s.name for s in services), flush=True)
    return code


# --- tuneline repro ----------------------------------------------------------------------

def run_repro(params, root: Path, dvc_args: Sequence[str]) -> int:
    """`dvc repro <dvc_args>` under one MLflow parent run; returns dvc's exit status."""
    from tuneline.orchestration.cachekey import raw_data_tags
    from tuneline.core.tracking.tracker import PARENT_RUN_ENV, end_parent_run, run_link, start_parent_run

    root = Path(root).resolve()
    run_id = start_parent_run(params.tracking, root, "pipeline dvc repro", tags={"tuneline.orchestrator": "dvc"})
    env = {**os.environ}
    if run_id:
        env[PARENT_RUN_ENV] = run_id
        print(f"MLflow parent run {run_id}: every stage of this repro is a child run; "
              f"{run_link(params.tracking, root, run_id)}", flush=True)
    # Same process group as us: Ctrl-C reaches dvc and its stage directly (the trainer saves);
    # we only wait, then record how it ended. SIGTERM to us is passed on to dvc.
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *dvc_args], cwd=root, env=env)
    interrupted: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        interrupted.append(signum)
        if signum == signal.SIGTERM and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        rc = process.poll()
        status = ("FINISHED" if rc == 0 else
                  "KILLED" if interrupted or rc in (130, 143, -signal.SIGINT, -signal.SIGTERM) else "FAILED")
        # The raw data as the scan stage listed it: no walk of the raw folders here.
        end_parent_run(params.tracking, root, run_id, status, tags=raw_data_tags(root))
    return returncode
