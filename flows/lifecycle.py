"""Everything a pipeline run starts stays in its care: the project lock, stopping on a signal, orphans of a killed run.

- `ProjectLock`: one run per project directory (an OS file lock, free again when the process dies however it dies).
  The lock file records the holder (pid and process start time), the process group of the stage running now and
  the MLflow pipeline run, so the next run can tell what a `kill -9` left behind.
- `clean_orphans`: before a run starts, processes a killed earlier run left (its DVC/stage process group, the
  temporary Prefect server of this project) are stopped, and its MLflow runs still RUNNING are marked KILLED; it is
  said in one line. Identity is the recorded pid *and* start time, so a recycled pid is never touched.
- `stop_on_signals`: SIGINT / SIGTERM become `PipelineStopped` in the flow (main thread); the running stage's
  process group gets SIGTERM (training then saves a checkpoint and exits), SIGKILL after `STOP_TIMEOUT` seconds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunepipe.errors import PipelineBusy, TunepipeError

log = logging.getLogger("tunepipe.flow")

LOCK_FILE = "outputs/.pipeline.lock"
STOP_TIMEOUT = float(os.environ.get("TUNEPIPE_STOP_TIMEOUT", "30"))  # a stage's time to checkpoint and exit


class PipelineStopped(TunepipeError):
    """The run was asked to stop (SIGINT: Ctrl-C, SIGTERM: a scheduler, systemd, timeout)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _process(pid: int | None, created: float | None):
    """The process `pid` if it is still the one that started at `created` (not a recycled pid), else None."""
    import psutil

    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        if created is not None and abs(process.create_time() - created) > 1.0:
            return None
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except psutil.Error:
        return None


def group_members(pgid: int) -> list:
    import psutil

    members = []
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def stop_group(pgid: int, *, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM to a process group, SIGKILL for what is left after `timeout`. True if it had to kill."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return sig == signal.SIGKILL
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_members(pgid):
                return sig == signal.SIGKILL
            time.sleep(0.2)
    return True


class ProjectLock:
    """The project's run lock and its record (JSON in the lock file)."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        self.handle = None
        self.record: dict[str, Any] = {}

    def previous(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, *, wait: bool) -> dict[str, Any]:
        """Take the lock; returns the record the previous holder left (non-empty if it did not end cleanly)."""
        import psutil

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = self.previous()
            self.handle.close()
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["created"])) if holder else "?"
            raise PipelineBusy(f"another pipeline run is in progress in {self.path.parents[1]} (pid "
                               f"{holder.get('pid', '?')} since {since}); wait for it or use --wait") from None
        left = self.previous()
        self.update(pid=os.getpid(), created=psutil.Process().create_time())
        return left

    def update(self, **values: Any) -> None:
        self.record.update(values)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps(self.record))
        self.handle.flush()

    def release(self) -> None:
        """Last of all: the record is cleared (a clean end leaves nothing to clean up), then the lock."""
        if self.handle is None:
            return
        self.handle.truncate(0)
        self.handle.flush()
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None


def _prefect_servers_of(home: str) -> list:
    """Temporary Prefect servers whose parent died, started for this project's PREFECT_HOME."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            if process.info["ppid"] == 1 and "prefect.server.api.server:create_app" in " ".join(
                    process.info["cmdline"] or []) and process.environ().get("PREFECT_HOME") == home:
                found.append(process)
        except psutil.Error:
            continue
    return found


def clean_orphans(root: Path, left: dict[str, Any]) -> list[str]:
    """Stop what a killed earlier run of this project left running; returns what was done, one phrase each."""
    done = []
    if left and _process(left.get("pid"), left.get("created")) is None:
        pgid = left.get("stage_pgid")
        if pgid and group_members(pgid):
            stop_group(pgid)
            done.append(f"stopped its stage {left.get('stage', '?')} (process group {pgid})")
        run_id = left.get("mlflow_run")
        if run_id:
            from flows import pipeline_runs

            killed = pipeline_runs.kill_runs(root, run_id)
            if killed:
                done.append(f"marked its {killed} MLflow run(s) KILLED")
    home = os.environ.get("PREFECT_HOME")
    for server in _prefect_servers_of(home) if home else []:
        server.terminate()
        try:
            server.wait(timeout=10)
        except Exception:  # psutil.TimeoutExpired
            server.kill()
        done.append(f"stopped its temporary Prefect server (pid {server.pid})")
    if done:
        log.warning("an earlier run of this project (pid %s) was killed: %s", left.get("pid", "?"), "; ".join(done))
    return done


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within this block, SIGINT/SIGTERM raise PipelineStopped in the main thread (where the flow runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise PipelineStopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def project_lock(root: Path, *, wait: bool = False) -> Iterator[ProjectLock]:
    """Hold the project's run lock for the block (released last, also on errors and signals)."""
    lock = ProjectLock(root)
    lock.left = lock.acquire(wait=wait)
    try:
        yield lock
    finally:
        lock.release()
