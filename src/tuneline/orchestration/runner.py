"""Run one stage as `python -m tuneline.cli --params P --root R <stage>` in its own process
group, and never leave it behind.

- The child starts a new session (its own process group), so a terminal's Ctrl-C reaches
  only the driver, which decides what the stage gets: one SIGTERM to the whole group. The
  trainer then finishes its step, saves a checkpoint and exits 143; the next run resumes.
- While the driver waits it holds SIGTERM and SIGINT (main thread only): the first one is
  forwarded to the group; once the group has exited, `StageStopped` is raised: an orderly
  stop on request (the trainer saved a checkpoint), which the flow turns into a Cancelled
  task and flow run rather than letting Prefect see a signal in a task (a crash).
- Any other exception while waiting (a cancellation raised in the driver) does the same:
  SIGTERM to the group, wait, SIGKILL after `grace_s`, re-raise.
- On Linux the child also gets PR_SET_PDEATHSIG=SIGTERM: if the driver is SIGKILLed, the
  stage is still told to stop (and saves) instead of running on as an orphan.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Mapping, Sequence

STOPPED_EXIT_CODE = 143  # the trainer's exit status after a SIGTERM-triggered checkpoint
DEFAULT_GRACE_S = 300.0  # finishing a step and writing a full checkpoint can take minutes on real models


class StageStopped(Exception):
    """The driver got SIGTERM/SIGINT (a cancel, Ctrl-C), passed it on, and the stage has stopped."""

    def __init__(self, stage: str, signum: int, returncode: int | None, tail: str) -> None:
        self.stage, self.signum, self.returncode, self.tail = stage, signum, returncode, tail
        super().__init__(f"stage {stage!r} stopped by signal {signum} (exit status {returncode})")


class StageProcessFailed(RuntimeError):
    """A stage subprocess exited with a non-zero status."""

    def __init__(self, stage: str, returncode: int, tail: str) -> None:
        self.stage, self.returncode, self.tail = stage, returncode, tail
        what = {2: "configuration error", STOPPED_EXIT_CODE: "stopped (checkpoint saved; run again to resume)"}
        reason = what.get(returncode, f"exit status {returncode}")
        super().__init__(f"stage {stage!r} failed: {reason}\n{tail}".rstrip())


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stage_command(stage: str, params_file: Path, root: Path, python: str | None = None,
                  args: Sequence[str] = ()) -> list[str]:
    """`python -m tuneline.cli --params P --root R <stage> [args]` (args: like `--shard 0/4`)."""
    return [python or sys.executable, "-m", "tuneline.cli", "--params", str(params_file), "--root", str(root), stage,
            *args]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_group(process: subprocess.Popen, grace_s: float = DEFAULT_GRACE_S, sent: bool = False) -> None:
    """SIGTERM the group (unless already sent), wait up to grace_s, then SIGKILL it; reap."""
    pgid = process.pid
    if not sent:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None:
        _signal_group(pgid, signal.SIGKILL)
        process.wait()
    # Grandchildren (accelerate launch workers) share the group: give them the same end.
    deadline = time.monotonic() + min(grace_s, 30.0)
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)


PROGRESS_INTERVAL_S = 5.0  # a progress bar reaches a log (Prefect's) at most this often
_LINE_END = re.compile(r"\r\n|\n|\r")


class OutputLines:
    """A stage's output as log lines. A progress bar redraws itself after a carriage return, and
    each redraw would become one log record (64 records for 30 training steps): redraws pass at
    most every `interval_s`, while every newline-ended line (the bar's final state included) and
    nothing blank passes."""

    def __init__(self, emit: Callable[[str], None], interval_s: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.emit, self.interval_s, self.clock = emit, interval_s, clock
        self.pending = ""
        self.last_progress = float("-inf")

    def feed(self, text: str) -> None:
        self.pending += text
        while (match := _LINE_END.search(self.pending)) is not None:
            if match.group() == "\r" and match.end() == len(self.pending):
                break  # maybe the first half of a CRLF: wait for the next read
            segment, ending = self.pending[:match.start()].rstrip(), match.group()
            self.pending = self.pending[match.end():]
            if not segment.strip():
                continue
            if ending == "\r":  # redrawn next: pass it only when the last one is old enough
                now = self.clock()
                if now - self.last_progress < self.interval_s:
                    continue
                self.last_progress = now
            self.emit(segment)

    def close(self) -> None:
        tail, self.pending = self.pending.strip(), ""
        if tail:
            self.emit(tail)


def run_stage_process(
    stage: str,
    params_file: Path,
    root: Path,
    env: Mapping[str, str] | None = None,
    on_start: Callable[[int], None] | None = None,
    echo: Callable[[str], None] | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    tail_lines: int = 40,
    args: Sequence[str] = (),
    command: Sequence[str] | None = None,
) -> str:
    """Run one stage to completion and return the tail of its output.

    `on_start(pgid)` is called once the group exists; `echo(line)` gets every output line
    (default: print); `args` go after the stage name (`--shard 0/4`); `command` replaces the
    stage's command line (`stage` then only names it in messages). Raises
    StageProcessFailed on a non-zero exit, StageStopped when a SIGTERM/SIGINT arrived (after
    the stage has stopped).
    """
    command = list(command) if command is not None else stage_command(stage, Path(params_file), Path(root), args=args)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=root, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=_set_parent_death_signal if sys.platform == "linux" else None,
    )
    tail: deque[str] = deque(maxlen=tail_lines)
    echo = echo or (lambda line: print(line, flush=True))

    def record(line: str) -> None:
        tail.append(line)
        try:
            echo(line)
        except Exception:  # logging must never kill the pump (the pipe would fill up)
            pass

    def pump() -> None:
        assert process.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        lines = OutputLines(record)
        while chunk := os.read(process.stdout.fileno(), 65536):
            lines.feed(decoder.decode(chunk))
        lines.feed(decoder.decode(b"", final=True))
        lines.close()
        process.stdout.close()

    reader = threading.Thread(target=pump, name=f"{stage}-output", daemon=True)
    reader.start()
    received: list[int] = []
    previous: dict[int, object] = {}

    def forward(signum: int, frame: object) -> None:
        if received:  # a second signal while the stage saves: it is already stopping
            return
        received.append(signum)
        print(f"\nsignal {signum}: stopping stage {stage} (SIGTERM to its process group), "
              "waiting for it to save", file=sys.stderr, flush=True)
        _signal_group(process.pid, signal.SIGTERM)

    in_main = threading.current_thread() is threading.main_thread()
    try:
        if in_main:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, forward)
        if on_start is not None:
            on_start(process.pid)
        deadline = None
        while process.poll() is None:
            if received and deadline is None:
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                stop_group(process, grace_s=0, sent=True)
                break
            time.sleep(0.1)
        if group_alive(process.pid):  # stragglers the stage left in its group: not ours to keep
            stop_group(process, grace_s=5.0)
    except BaseException:
        stop_group(process, grace_s, sent=bool(received))
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reader.join(timeout=10)
    if received:  # stopped on request: never go on to the next stage
        raise StageStopped(stage, received[0], process.returncode, "\n".join(tail))
    if process.returncode != 0:
        raise StageProcessFailed(stage, process.returncode, "\n".join(tail))
    return "\n".join(tail)
