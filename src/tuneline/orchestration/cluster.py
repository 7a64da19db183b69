"""The shard tasks on a Dask cluster (prefect-dask's DaskTaskRunner): start a local cluster or join
one, and check that every worker sees the project's item store before any work.

    python -m flows.pipeline --task-runner dask                      # a LocalCluster on this machine
    python -m flows.pipeline --task-runner dask --dask-address tcp://head:8786   # join a scheduler

A local cluster has one worker process per GPU, each started with CUDA_VISIBLE_DEVICES=<its GPU>
(no GPU: `workers` processes); a shard task's stage process inherits its worker's environment, so
it runs on that worker's GPU. Workers started by hand (`dask worker`) are pinned the same way:
CUDA_VISIBLE_DEVICES=<gpu> in the worker's environment, one thread per worker.

The shard processes write into the shared item store and read the project's files (params,
manifests): every worker must see the same project directory at the same path. `check_shared_store`
makes every worker write a probe file under `<store>/.probe/<token>/` and read the others' (and this
process reads them all), and refuses, naming the worker and the path, when one cannot.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

from tuneline.core.params import ParamsError

TASK_RUNNERS = ("threads", "dask")
PROBE_DIR = ".probe"
_ADDRESS = re.compile(r"^(?:(?P<scheme>[a-z]+)://)?(?P<host>\[[0-9a-fA-F:]+\]|[^:/\s\[\]]+):(?P<port>\d+)$")
SCHEMES = ("tcp", "tls")


class ClusterError(RuntimeError):
    """The Dask cluster cannot run this project's shards (a worker cannot see the store, the scheduler
    cannot be reached); raised before any task."""


def check_runner(task_runner: str, dask_address: Optional[str]) -> None:
    """ParamsError naming the flow parameter, its value and what is allowed, for a bad choice."""
    if task_runner not in TASK_RUNNERS:
        raise ParamsError(f"task_runner: {task_runner!r} is not one of {', '.join(map(repr, TASK_RUNNERS))}")
    if dask_address is None:
        return
    if task_runner != "dask":
        raise ParamsError(f"dask_address: {dask_address!r} is set but task_runner is {task_runner!r}; "
                          "the address is for task_runner='dask'")
    match = _ADDRESS.match(dask_address.strip())
    if not match or (match["scheme"] or "tcp") not in SCHEMES or not 0 < int(match["port"]) < 65536:
        raise ParamsError(f"dask_address: {dask_address!r} is not a Dask scheduler address; "
                          "expected tcp://host:port (or tls://host:port), e.g. tcp://10.0.0.5:8786")


def local_cluster(workers: int, gpus: list[str], api_url: Optional[str] = None) -> Any:
    """A distributed.LocalCluster of worker processes, one thread each: one worker per GPU with
    CUDA_VISIBLE_DEVICES=<that GPU> in its environment, else `workers` workers. `api_url`: the
    Prefect API the workers report to, as PREFECT_API_URL in their environment (the task's context
    carries it too, but Prefect's background threads in a worker read the process's settings: without
    it they would start a temporary server of their own, left running after the worker)."""
    from distributed import LocalCluster

    count = len(gpus) or max(1, workers)
    # n_workers=0, then one spec per worker: LocalCluster gives every worker the same options,
    # and the GPU pin differs per worker (Nanny's `env` is set before the worker process starts).
    cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        base = cluster.new_spec
        for index in range(count):
            options = dict(base["options"])
            env = dict(options.get("env") or {})
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[index]
            if api_url:
                env["PREFECT_API_URL"] = api_url
            options["env"] = env
            cluster.worker_spec[index] = {"cls": base["cls"], "options": options}
        cluster.scale(count)
        cluster.wait_for_workers(count, timeout=120)
    except BaseException:
        cluster.close()
        raise
    return cluster


def dask_task_runner(address: Optional[str], workers: int, gpus: list[str], api_url: Optional[str] = None,
                     connect_timeout_s: float = 20) -> Any:
    """prefect-dask's DaskTaskRunner on a new local cluster (address None) or the scheduler at `address`."""
    from prefect_dask import DaskTaskRunner

    if address:
        # The client's connect timeout: a wrong or dead address fails in seconds, not Dask's 30 s x retries.
        return DaskTaskRunner(address=address, client_kwargs={"timeout": f"{connect_timeout_s}s"})
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"workers": workers, "gpus": gpus, "api_url": api_url})


def start_client(runner: Any, address: Optional[str]) -> Any:
    """The runner's Dask client (connects to, or starts, the cluster); a ClusterError naming the
    address when the scheduler cannot be reached."""
    try:
        return runner.client
    except (OSError, TimeoutError) as error:
        where = f"the Dask scheduler at dask_address={address!r}" if address else "a local Dask cluster"
        raise ClusterError(f"cannot connect to {where}: {error}") from error


@dataclass(frozen=True)
class WorkerView:
    """What one worker found: its probe written, the others' probes it could not read, the project file
    it could not see, and its pin."""

    address: str
    name: str
    host: str
    gpu: Optional[str]
    error: Optional[str]
    missing: tuple[str, ...]


class WorkerRunner(Protocol):
    """The part of distributed.Client the probe uses: run a function on every worker, {address: result}."""

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Mapping[str, Any]: ...


def _probe_name(address: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", address) + ".txt"


def write_probe(probe_dir: str, project_file: str, dask_worker: Any = None) -> dict[str, Any]:
    """On a worker: write this worker's probe file; say whether it sees `project_file`."""
    address = dask_worker.address if dask_worker is not None else "local"
    found: dict[str, Any] = {"name": str(dask_worker.name) if dask_worker is not None else "local",
                             "host": socket.gethostname(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                             "error": None}
    try:
        folder = Path(probe_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _probe_name(address)).write_text(f"{address}\n", "utf-8")
        if not Path(project_file).is_file():
            found["error"] = f"cannot see the project's file {project_file}"
    except OSError as error:
        found["error"] = f"cannot write {probe_dir}: {error}"
    return found


def read_probes(probe_dir: str, addresses: list[str]) -> list[str]:
    """The workers (by address) whose probe file is not in `probe_dir` with their address in it."""
    missing = []
    for address in addresses:
        try:
            seen = (Path(probe_dir) / _probe_name(address)).read_text("utf-8").strip() == address
        except OSError:
            seen = False
        if not seen:
            missing.append(address)
    return missing


def check_shared_store(client: WorkerRunner, store_dir: Path, project_file: Path) -> list[WorkerView]:
    """Every worker writes `<store_dir>/.probe/<token>/<worker>.txt`, then reads every worker's; this
    process reads them too. A ClusterError naming each worker that cannot see the store (and the path)
    when one cannot; the workers' views otherwise. The probe folder is removed afterwards."""
    import shutil

    probe_dir = store_dir / PROBE_DIR / uuid.uuid4().hex
    try:
        written = dict(client.run(write_probe, str(probe_dir), str(project_file)))
        if not written:
            raise ClusterError("the Dask cluster has no workers")
        addresses = sorted(written)
        unread = dict(client.run(read_probes, str(probe_dir), addresses))
        here = read_probes(str(probe_dir), addresses)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    views = [WorkerView(address, written[address]["name"], written[address]["host"], written[address]["gpu"],
                        written[address]["error"], tuple(unread.get(address, ()))) for address in addresses]
    problems = []
    for view in views:
        who = f"worker {view.name} ({view.address} on {view.host})"
        if view.error:
            problems.append(f"{who} {view.error}")
        elif view.missing:
            others = ", ".join(m for m in view.missing if m != view.address)
            if view.address in view.missing:
                problems.append(f"{who} cannot read back its own probe file in {probe_dir}")
            if others:
                problems.append(f"{who} does not see the probe files of {others} in {probe_dir}")
        if view.address in here and not view.error:
            problems.append(f"this flow process ({socket.gethostname()}) does not see the probe file of {who} in {probe_dir}")
    if problems:
        raise ClusterError(
            f"the item store {store_dir} is not shared by every Dask worker: " + "; ".join(problems)
            + ". Put the project and its store (params store_dir) on a file system every worker mounts at "
              "the same path.")
    return views


SERVER_HINT = ("Dask workers need the Prefect server the flow uses: run one every machine reaches "
               "(`prefect server start --host 0.0.0.0`) and start the flow and each `dask worker` with "
               "PREFECT_API_URL=http://<that host>:4200/api.")


def check_api_reachable(client: WorkerRunner, api_url: Optional[str]) -> None:
    """Every worker is configured for the Prefect API the flow uses (PREFECT_API_URL) and reaches it;
    a ClusterError naming the worker and the URL otherwise. `api_url` None: the flow has no server
    (a temporary one, which a cluster it joins cannot have been told about)."""
    if not api_url:
        raise ClusterError("joining a Dask cluster needs a Prefect server: this flow runs without one "
                           "(PREFECT_API_URL is unset). " + SERVER_HINT)
    answers = dict(client.run(_reach, api_url))
    failed = [f"worker {address}: {answer}" for address, answer in sorted(answers.items()) if answer]
    if failed:
        raise ClusterError(f"Dask workers cannot report to the Prefect API at {api_url} ({'; '.join(failed)}). "
                           + SERVER_HINT)


def _reach(api_url: str) -> Optional[str]:
    """On a worker: None when its PREFECT_API_URL is `api_url` and GET <api_url>/health answers, else why not."""
    import urllib.request

    own = (os.environ.get("PREFECT_API_URL") or "").rstrip("/")
    if own != api_url.rstrip("/"):
        return f"its PREFECT_API_URL is {own or 'unset'!s}"
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=10) as answer:
            answer.read()
        return None
    except OSError as error:
        return f"GET {api_url.rstrip('/')}/health failed: {error}"
