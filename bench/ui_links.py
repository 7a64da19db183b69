"""Click-path check: do the MLflow addresses tuneline prints open MLflow's model-training view?

    python -m bench.ui_links [--db /tmp/demo/mlflow.db] [--work /tmp/browser] [--chromium /usr/bin/chromium]

A check a person runs (it needs a browser, so the test suite does not). It copies a tracking database
(a demo run's `mlflow.db`, with its `mlartifacts` beside it) into --work, adds a pipeline parent run
with a train child run through tuneline's own tracker (the keys the train stage logs), starts
`mlflow server` on the copy and drives headless Chromium (Playwright over the system's Chromium:
`pip install playwright`, no browser download) through:

  a  the experiment's runs list (`links.runs_url`) and the experiments list `tuneline ui` prints
  b  a click on a run in that list: the run page
  c  a pipeline parent run's address (`tracker.run_link`, what `tuneline repro` and the flow print)
  d  a new user's path: MLflow's home page, a click on the experiment; then the same after setting
     the sidebar's "Model training" switch once, as the README says
  e  the train run's "Model metrics" tab: the order of its charts (the loss, `loss/train`, must be first)

Screenshots of each step go to <work>/shots. Prints PASS / FAIL / NOTE lines (NOTE: what MLflow does
on its own, which tuneline cannot change) and exits 1 on a FAIL. Every server and browser it starts is
stopped before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import parse_qs, urlsplit, urlunsplit

# Flags this machine's closed network needs (no background connections, no GPU, no sandbox as root).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# What each view shows once loaded: the runs table's header, a run page's tab, GenAI's overview.
RUNS_MARKER, RUN_MARKER, HOME_MARKER = "Run Name", "Model metrics", "Welcome to MLflow"
# GenAI's overview ("Detect Issues") and its sidebar ("Evaluation runs"; a run page's breadcrumb then reads
# "Evaluations"): the model-training sidebar has "Runs", "Models", "Traces" instead.
GENAI_MARKERS = ("Detect Issues", "Evaluation runs")
ML = "machine_learning"


@dataclass
class Report:
    failed: int = 0
    lines: list[str] = field(default_factory=list)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.failed += not passed
        self._say(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}")

    def note(self, name: str, detail: str) -> None:
        self._say(f"NOTE  {name}: {detail}")

    def _say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)


# --- the tracking database -------------------------------------------------------------------

def copy_store(db: Path, work: Path) -> Path:
    """A fresh copy of the database and its artifacts; the copy's artifact addresses point at the copy,
    so nothing this check does writes beside the original."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    copy = store / "mlflow.db"
    shutil.copy2(db, copy)
    artifacts = db.parent / "mlartifacts"
    if artifacts.is_dir():
        shutil.copytree(artifacts, store / "mlartifacts")
    old, new = artifacts.resolve().as_uri(), (store / "mlartifacts").resolve().as_uri()
    with sqlite3.connect(copy) as connection:
        connection.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        connection.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    return copy


@dataclass
class Seeded:
    experiment_id: str
    parent_link: str   # tracker.run_link of the pipeline run, as printed
    train_link: str    # Tracker.link of the train run
    train_run_id: str
    logged_keys: list[str]


def seed_runs(config: Any, root: Path) -> Seeded:
    """A pipeline parent run and a train child run, made by tuneline's tracker."""
    from tuneline.core.tracking.tracker import Tracker, end_parent_run, run_link, start_parent_run

    parent = start_parent_run(config, root, "ui-links check")
    with Tracker.start(config, root, "train", "train", parent_run_id=parent) as tracker:
        # The keys stages/train/stage.py logs: on_log every log step, on_validate at a validation step.
        for step in range(1, 5):
            tracker.log_metrics({"loss": 0.6 / step, "seconds_per_step": 0.2, "epoch": step // 2,
                                 "samples_per_second": 10.0, "lr/unet": 1e-4, "grad_norm": 0.5 / step}, step=step)
        tracker.log_metrics({"val/loss": 0.55, "val/loss_unweighted": 0.56}, step=4)
        tracker.set_tags({"tuneline.report.steps": 4})
        train_link, train_run_id = tracker.link(), tracker.run_id
    end_parent_run(config, root, parent)
    parent_link = run_link(config, root, parent)
    assert parent_link and train_link and train_run_id, "tracking produced no links"
    experiment_id = re.search(r"#/experiments/([^/]+)/", parent_link).group(1)
    keys = ["loss", "seconds_per_step", "epoch", "samples_per_second", "lr/unet", "grad_norm", "val/loss",
            "val/loss_unweighted"]
    return Seeded(experiment_id, parent_link, train_link, train_run_id, keys)


def on_port(link: str, base: str) -> str:
    """A link tuneline built for its default UI address, pointed at this check's server instead."""
    target = urlsplit(base)
    return urlunsplit(urlsplit(link)._replace(scheme=target.scheme, netloc=target.netloc))


# --- the server --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(db: Path, port: int, log: Path, timeout_s: float = 120) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({server.returncode}); see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"mlflow server did not answer on port {port} within {timeout_s:.0f} s; see {log}")


def stop_server(server: subprocess.Popen) -> None:
    """The server's whole process group (mlflow server starts uvicorn/gunicorn children)."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# --- the browser -------------------------------------------------------------------------------

@dataclass
class View:
    path: str            # the address's hash route, e.g. /experiments/1/runs
    workflow: str | None
    kind: str            # runs-list, run-page, genai, home, other

    def __str__(self) -> str:
        return f"{self.kind} (#{self.path}, workflowType={self.workflow})"


def settle(page: Any, timeout_ms: int = 30000) -> View:
    """Wait until one of the known views has rendered, then say which it is."""
    markers = [RUNS_MARKER, RUN_MARKER, *GENAI_MARKERS, HOME_MARKER]
    try:
        page.wait_for_function("(markers) => markers.some(m => document.body.innerText.includes(m))", arg=markers,
                               timeout=timeout_ms)
    except Exception:  # classified as "other" below; the screenshot shows what there was
        pass
    page.wait_for_timeout(1500)  # let redirects (the experiment page picks its tab) finish
    fragment = urlsplit(page.url).fragment
    path, _, query = fragment.partition("?")
    workflow = parse_qs(query).get("workflowType", [None])[0]
    text = page.inner_text("body")
    if any(marker in text for marker in GENAI_MARKERS) or re.search(r"/(overview|traces)$", path):
        kind = "genai"
    elif re.fullmatch(r"/experiments/[^/]+/runs/[^/]+(/[^/]+)?", path) and RUN_MARKER in text:
        kind = "run-page"
    elif re.fullmatch(r"/experiments/[^/]+/runs", path) and RUNS_MARKER in text:
        kind = "runs-list"
    elif HOME_MARKER in text:
        kind = "home"
    else:
        kind = "other"
    return View(path, workflow, kind)


def shot(page: Any, shots: Path, name: str, full_page: bool = False) -> str:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return str(path)


def chart_layout(page: Any, run_id: str) -> list[tuple[str, list[str]]]:
    """The Model metrics tab's sections and charts in display order, from the layout MLflow 3.17 keeps
    for the run in the browser's localStorage (RunViewMetricChartsV2, store 'RunPage', '<run>-model')."""
    stored = page.evaluate("""(runId) => Object.keys(localStorage)
        .filter(k => k.includes(runId + '-model') && k.includes('chartUIState'))
        .map(k => localStorage.getItem(k))""", run_id)
    if not stored:
        return []
    state = json.loads(stored[0])
    charts = [c for c in state.get("compareRunCharts") or [] if not c.get("deleted")]
    layout = []
    for section in state.get("compareRunSections") or []:
        keys = [c.get("metricKey") or ",".join(c.get("imageKeys") or []) for c in charts
                if c.get("metricSectionId") == section["uuid"]]
        if keys:
            layout.append((section["name"], keys))
    return layout


def dom_sections(page: Any) -> list[str]:
    """Section headers as the page shows them, top to bottom."""
    return page.evaluate("""() => Array.from(document.querySelectorAll(
        '[data-testid="experiment-view-compare-runs-section-header"]')).map(e => e.innerText.split('\\n')[0])""")


def click_path(base: str, seeded: Seeded, demo_train: str | None, chromium: str, work: Path, shots: Path,
               report: Report) -> None:
    from playwright.sync_api import sync_playwright

    from tuneline.core.tracking.links import experiments_url, runs_url
    from tuneline.core.tracking.tracker import chart_key

    with sync_playwright() as playwright:
        contexts: list[Any] = []

        def fresh_page() -> Any:
            """A new browser profile (empty storage, as a new user has)."""
            context = playwright.chromium.launch_persistent_context(
                tempfile.mkdtemp(prefix="profile-", dir=work), executable_path=chromium, headless=True,
                args=CHROMIUM_FLAGS, viewport={"width": 1440, "height": 900})
            contexts.append(context)
            page = context.new_page()
            page.set_default_timeout(30000)
            return page

        def click_link(page: Any, name: str) -> None:
            """A link in the page's list (a table row), not the sidebar's entry of the same name."""
            in_rows = page.get_by_role("row").get_by_role("link", name=name, exact=True)
            (in_rows if in_rows.count() else page.get_by_role("link", name=name, exact=True)).first.click()

        def set_switch(page: Any) -> None:
            """The sidebar's GenAI / Model training switch, set to Model training (MLflow stores it)."""
            page.goto(base + "/")
            settle(page)
            page.get_by_text("Model training", exact=True).first.click()
            page.wait_for_timeout(500)

        def click_after_switch(page: Any, address: str, link: str) -> View:
            """With the switch set once: open `address`, click `link` in its list; where that lands."""
            set_switch(page)
            page.goto(address)
            settle(page)
            click_link(page, link)
            return settle(page)

        try:
            page = fresh_page()
            # (a) the experiment's runs list, and the experiments list `tuneline ui` prints.
            page.goto(runs_url(base, seeded.experiment_id))
            view = settle(page)
            report.check("a runs_url", view.kind == "runs-list" and view.workflow == ML,
                         f"{view}; {shot(page, shots, 'a1_runs_url')}")
            page.goto(experiments_url(base))
            settle(page, 5000)
            report.note("a experiments_url", f"#{urlsplit(page.url).fragment}; {shot(page, shots, 'a2_experiments_url')}")

            # (b) from the runs list, a click on the train run: fresh browser, then with the switch set.
            page = fresh_page()
            page.goto(runs_url(base, seeded.experiment_id))
            settle(page)
            click_link(page, "train")
            view = settle(page)
            report.note("b runs_url -> click a run (fresh browser)", f"{view}; {shot(page, shots, 'b1_clicked_run_fresh')}")
            view = click_after_switch(page, runs_url(base, seeded.experiment_id), "train")
            report.check("b switch set once -> runs_url -> click a run", view.kind == "run-page",
                         f"{view}; {shot(page, shots, 'b2_clicked_run_after_switch')}")

            # (c) the pipeline parent run's address, as `tuneline repro` and the flow print it.
            page = fresh_page()
            page.goto(on_port(seeded.parent_link, base))
            view = settle(page)
            report.check("c parent run_link (fresh browser)", view.kind == "run-page" and view.workflow == ML,
                         f"{seeded.parent_link} -> {view}; {shot(page, shots, 'c1_parent_run')}")
            page.goto(on_port(seeded.train_link, base))
            view = settle(page)
            report.check("c train Tracker.link (fresh browser)", view.kind == "run-page" and view.workflow == ML,
                         f"{view}; {shot(page, shots, 'c2_train_run')}")

            # (d) a new user: home page, click the experiment; the same from the printed experiments list;
            # then after setting the switch once (the README's advice).
            page = fresh_page()
            page.goto(base + "/")
            settle(page)
            shot(page, shots, "d1_home")
            click_link(page, "tuneline")
            view = settle(page)
            report.note("d home -> click experiment (fresh browser)", f"{view}; {shot(page, shots, 'd2_home_click_fresh')}")
            page = fresh_page()
            page.goto(experiments_url(base))
            settle(page, 5000)
            click_link(page, "tuneline")
            view = settle(page)
            report.note("d experiments_url -> click experiment (fresh browser)",
                        f"{view}; {shot(page, shots, 'd3_list_click_fresh')}")
            view = click_after_switch(page, base + "/", "tuneline")
            report.check("d switch set once -> home -> click experiment", view.kind == "runs-list",
                         f"{view}; {shot(page, shots, 'd4_home_click_after_switch')}")

            # (e) the train runs' "Model metrics" charts: which comes first.
            page = fresh_page()
            for label, link, run_id in (("tuneline train run", on_port(seeded.train_link, base), seeded.train_run_id),
                                        *((("demo train run", f"{base}/#/experiments/{seeded.experiment_id}/runs/"
                                            f"{demo_train}?workflowType={ML}", demo_train),)
                                          if demo_train else ())):
                page.goto(link)
                settle(page)
                page.get_by_text("Model metrics", exact=True).first.click()
                page.wait_for_selector('[data-testid="experiment-view-compare-runs-section-header"]')
                page.wait_for_timeout(2000)
                layout = chart_layout(page, run_id)
                name = "e_" + label.split()[0] + "_model_metrics"
                order = " | ".join(f"{section}: {', '.join(keys)}" for section, keys in layout)
                first = layout[0][1][0] if layout else None
                report.note(f"e {label} chart order", f"{order}; page sections {dom_sections(page)}; "
                            f"{shot(page, shots, name, full_page=True)}")
                if label.startswith("tuneline"):  # logged by this tuneline: the loss is the first chart
                    report.check(f"e {label} first chart is the loss", first == chart_key("loss"), str(first))
                else:  # an older run: what it shows
                    report.note(f"e {label} first chart", str(first))
        finally:
            for context in contexts:
                context.close()
            for profile in work.glob("profile-*"):  # ~10 MB each
                shutil.rmtree(profile, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("/tmp/demo/mlflow.db"), help="tracking database to copy")
    parser.add_argument("--work", type=Path, default=Path("/tmp/browser"), help="where the copy and shots go")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--experiment", default="tuneline")
    args = parser.parse_args(argv)

    from tuneline.core.tracking.config import TrackingConfig
    from tuneline.core.tracking.links import ui_base

    work = args.work.resolve()
    shots = work / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    db = copy_store(args.db.resolve(), work)
    config = TrackingConfig(tracking_uri=f"sqlite:///{db}", artifact_root=str(db.parent / "mlartifacts"),
                            experiment=args.experiment, system_metrics=False)
    seeded = seed_runs(config, db.parent)
    with sqlite3.connect(db) as connection:  # the copied demo's own (older) train run, if it has one
        row = connection.execute("SELECT run_uuid FROM runs WHERE name = 'train' AND run_uuid != ? "
                                 "ORDER BY start_time DESC LIMIT 1", (seeded.train_run_id,)).fetchone()
    report = Report()
    port = free_port()
    base = ui_base(config, port)
    started = time.perf_counter()
    server = start_server(db, port, work / "mlflow-server.log")
    try:
        import mlflow

        print(f"MLflow {mlflow.__version__} on {base}; {subprocess.run([args.chromium, '--version'], check=False, capture_output=True, text=True).stdout.strip()}")
        click_path(base, seeded, row[0] if row else None, args.chromium, work, shots, report)
    finally:
        stop_server(server)
    print(f"{'FAIL' if report.failed else 'ok'}: {report.failed} failed check(s) in {time.perf_counter() - started:.0f} s; "
          f"screenshots in {shots}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
