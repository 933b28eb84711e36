"""The project's own Prefect server, for schedules (ephemeral Prefect, what `tunepipe run` uses, runs no scheduler).

Prefect's state lives under the project: PREFECT_HOME is `<project>/.prefect` unless the user set it, so two
projects on one machine never share a database, runs, deployments or schedules. `start` launches
`prefect server start` bound to 127.0.0.1 on a free port, in a session of its own, logging to
`<home>/server.log`, and records it in `<home>/tunepipe-server.json` (pid, process start time, API URL), so that
`status` and `stop` find exactly that process later, even from another shell, and never mistake a recycled pid
for it. `tunepipe serve` stops the server it started when it exits; `tunepipe serve --stop` stops one left behind
(e.g. after a kill -9 of serve).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
RECORD = "tunepipe-server.json"


def project_home(root: Path) -> Path:
    """PREFECT_HOME for this project: as set by the user, else `<root>/.prefect` (set in the environment here, before
    anything imports prefect, which reads it at import)."""
    home = Path(os.environ.get("PREFECT_HOME") or root / ".prefect")
    os.environ["PREFECT_HOME"] = str(home)
    return home


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class Server:
    pid: int
    created: float  # the process's start time (psutil), so a recycled pid is never taken for the server
    api_url: str
    log: str

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def alive(self) -> bool:
        import psutil

        try:
            process = psutil.Process(self.pid)
            return abs(process.create_time() - self.created) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def recorded(home: Path) -> Server | None:
    try:
        return Server(**json.loads((home / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start(home: Path, *, wait_s: float = 120) -> Server:
    """Start the project's server (its own session: Ctrl-C in a terminal reaches serve, which then stops it)."""
    import psutil

    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = home / "server.log"
    api_url = f"http://{HOST}:{port}/api"
    # the UI's browser code asks this URL for its data (it would default to port 4200, not ours)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": api_url}
    env.pop("PREFECT_API_URL", None)
    with open(log, "ab") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port",
                                 str(port)], stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    server = Server(pid=proc.pid, created=psutil.Process(proc.pid).create_time(), api_url=api_url, log=str(log))
    (home / RECORD).write_text(json.dumps(asdict(server), indent=2) + "\n")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if healthy(server.api_url):
            return server
        if proc.poll() is not None:
            (home / RECORD).unlink(missing_ok=True)
            raise RuntimeError(f"the Prefect server exited with {proc.returncode} while starting; see {log}")
        time.sleep(0.5)
    stop(home)
    raise RuntimeError(f"the Prefect server did not answer within {wait_s:.0f}s; see {log}")


def ensure(home: Path) -> tuple[Server, bool]:
    """The project's running server, or a new one: (server, started now)."""
    server = recorded(home)
    if server is not None and server.alive() and healthy(server.api_url):
        return server, False
    return start(home), True


def stop(home: Path, *, timeout: float = 20) -> Server | None:
    """Stop the project's recorded server and everything in its session; None if none was running."""
    server = recorded(home)
    (home / RECORD).unlink(missing_ok=True)
    if server is None or not server.alive():
        return None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)  # its own session: the uvicorn process and anything it started
        except ProcessLookupError:
            return server
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.alive():
            time.sleep(0.2)
        if not server.alive():
            return server
    return server
