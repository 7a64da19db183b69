"""Two-machine check on one machine: the README's `--dask-address` recipe, every part its own process.

    python -m bench.dask_join [--work /tmp/dask-join] [--workers 2]

A check a person runs (it starts a Prefect server, a Dask scheduler and workers: about a minute, too long for
the test suite, whose tests/test_dask.py runs a LocalCluster inside the flow). It copies the demo project
(data stages scan .. latents, MLflow off) into --work and starts, as README "Data stages on a Dask cluster"
says for two machines, with 127.0.0.1 for the hosts:

  `prefect server start`, `dask scheduler`, and per "GPU" one `dask worker --nthreads 1` with its own
  CUDA_VISIBLE_DEVICES and PREFECT_API_URL (CPU torch ignores the pin; the worker still reports it).

Then it checks, printing PASS / FAIL lines (exit 1 on a FAIL):

  a  the flow without PREFECT_API_URL refuses to join (exit 2, the message the README quotes), computing nothing;
  b  the flow with it joins: every worker is named with its GPU, each worker's probe sees the store, the caption
     and latents shards ran (one per worker) and the assembling stages computed nothing;
  c  the same command again: every task but `scan` is a cache hit.

Every process it starts is stopped before it exits. Not a second machine: the network between two hosts and a
shared file system's latency are what this cannot show.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
STAGES = ("scan", "ingest", "bucket", "caption", "latents")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def make_project(root: Path) -> None:
    """The demo through latents, as tests/test_flows.py's demo_project makes it, MLflow off."""
    import yaml

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for name in ("params.yaml", ".dvcignore", "prompts.yaml"):
        shutil.copy(REPO / name, root / name)
    for name in ("stages", "src", "data/raw", "data/caption_edits", ".dvc"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    document = yaml.safe_load((REPO / "dvc.yaml").read_text())
    document["stages"] = {name: spec for name, spec in document["stages"].items() if name in STAGES}
    (root / "dvc.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"] = {**params.get("tracking", {}), "enabled": False}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def flow(root: Path, address: str, env: dict[str, str], log: Path) -> tuple[int, str, dict | None]:
    """`python -m flows.pipeline --task-runner dask --dask-address ...`: exit code, output, its JSON summary."""
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(root), "--task-runner", "dask",
                               "--dask-address", address], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=600).returncode
    text = log.read_text()
    start = text.find("\n{")
    try:
        summary = json.loads(text[start + 1:text.rfind("}") + 1]) if start >= 0 else None
    except json.JSONDecodeError:
        summary = None
    return code, text, summary


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dask_join", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dask-join"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    work: Path = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    root = work / "project"
    make_project(root)
    bin_dir = Path(sys.executable).parent
    base = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    base.pop("PREFECT_API_URL", None)
    server_port, scheduler_port = free_port(), free_port()
    api = f"http://127.0.0.1:{server_port}/api"
    address = f"tcp://127.0.0.1:{scheduler_port}"
    processes: list[subprocess.Popen] = []
    failures = 0

    def start(name: str, command: list[str], env: dict[str, str]) -> None:
        log = (work / "logs" / f"{name}.log").open("w")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))

    def check(name: str, passed: bool, detail: str) -> None:
        nonlocal failures
        failures += not passed
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}", flush=True)

    try:
        start("prefect-server", [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(server_port)], base)
        start("dask-scheduler", [str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                 str(scheduler_port), "--dashboard-address", "127.0.0.1:0"], base)
        for gpu in range(args.workers):
            start(f"dask-worker-{gpu}", [str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--name",
                                         f"host-gpu{gpu}", "--dashboard-address", "127.0.0.1:0"],
                  {**base, "PREFECT_API_URL": api, "CUDA_VISIBLE_DEVICES": str(gpu)})
        if not wait_healthy(f"{api}/health", 120):
            check("setup", False, f"the Prefect server did not answer at {api} (logs in {work / 'logs'})")
            return 1

        code, text, _ = flow(root, address, base, work / "logs/flow-no-server.log")
        refused = "joining a Dask cluster needs a Prefect server" in text
        check("a no server", code == 2 and refused and not (root / "data/ingested").exists(),
              f"exit {code}, {'the README message' if refused else 'no refusal message'}")

        with_api = {**base, "PREFECT_API_URL": api}
        started = time.monotonic()
        code, text, summary = flow(root, address, with_api, work / "logs/flow-joined.log")
        seconds = time.monotonic() - started
        if code != 0 or summary is None:
            check("b joined", False, f"exit {code}: see {work / 'logs/flow-joined.log'}")
            return 1
        workers = sorted((w["name"], w["gpu"]) for w in summary["dask"]["workers"])
        expected = sorted((f"host-gpu{gpu}", str(gpu)) for gpu in range(args.workers))
        stages = summary["stages"]
        shards = {stage: [s["shard"] for s in stages[stage]["shards"] if not s["cached"]] for stage in ("caption", "latents")}
        probes = text.count("sees the store")
        assembled = {stage: json.loads((root / f"reports/{stage}.json").read_text())["computed"]
                     for stage in ("caption", "latents")}
        check("b joined", workers == expected and probes == args.workers
              and all(len(ran) == args.workers for ran in shards.values()) and assembled == {"caption": 0, "latents": 0},
              f"{seconds:.0f} s; workers {workers}; {probes} saw the store; shards ran {shards}; "
              f"assembled computed {assembled}")

        code, _, summary = flow(root, address, with_api, work / "logs/flow-again.log")
        misses = sorted(stage for stage, result in (summary or {}).get("stages", {}).items()
                        if not result["cached"] and stage != "scan")
        check("c again", code == 0 and summary is not None and not misses,
              f"exit {code}; tasks that ran besides scan: {misses or 'none'}")
    finally:
        for process in reversed(processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    print(f"logs: {work / 'logs'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(run())
