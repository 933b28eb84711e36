"""A local Prefect server for schedules: ephemeral Prefect (what `tunepipe run` uses) runs no scheduler.

`ensure_server()` reuses the server PREFECT_API_URL points to, or one already listening on 127.0.0.1:4200, and
otherwise starts `prefect server start` bound to 127.0.0.1 in the background (its log in outputs/prefect-server.log)
and waits until it answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 4200


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def ensure_server(root: Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, wait_s: float = 90) -> str:
    """Return the API URL of a running Prefect server, starting a local one if needed."""
    configured = os.getenv("PREFECT_API_URL")
    if configured:
        if not healthy(configured):
            raise RuntimeError(f"PREFECT_API_URL={configured} does not answer; start that server or unset it")
        return configured
    api_url = f"http://{host}:{port}/api"
    if healthy(api_url):
        return api_url
    log = root / "outputs" / "prefect-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                         stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if healthy(api_url):
            return api_url
        time.sleep(1)
    raise RuntimeError(f"the Prefect server did not come up within {wait_s:.0f}s; see {log}")
