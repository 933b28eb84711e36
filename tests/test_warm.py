"""The warm server: a command handed to it behaves like `python -m module` run by the caller — same output streams,
working directory, environment, arguments and exit status — and never recurses, leaks or outlives its caller."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tunepipe import warm

# A stand-in for a stage: it asks the server to run it (as stages/common.run does), then does its work.
PROBE = textwrap.dedent("""
    import json, os, sys, time
    from tunepipe import warm

    spec = sys.modules["__main__"].__spec__
    code = warm.run_in_server(spec.name, sys.argv[1:])
    if code is not None:
        sys.exit(code)
    mode = sys.argv[1]
    if mode == "report":
        print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "probe": os.environ.get("PROBE"),
                          "stdin": sys.stdin.readline().strip(), "pid": os.getpid(), "ppid": os.getppid()}))
        print("to stderr", file=sys.stderr)
        sys.exit(int(sys.argv[2]))
    if mode == "sleep":
        open(sys.argv[2], "w").write(str(os.getpid()))
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            open(sys.argv[2] + ".interrupted", "w").write("yes")
            raise
""")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("warm")
    (work / "probe.py").write_text(PROBE)
    with warm.server(dict(os.environ), preload=("json",), setup=None) as address:
        assert address and Path(address).exists()
        yield work, {**os.environ, warm.ENV: address}
    assert not Path(address).exists()  # the socket's folder is removed with the server


def probe(work: Path, env: dict, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "probe", *args], cwd=work, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_no_server_means_run_it_yourself(monkeypatch):
    monkeypatch.delenv(warm.ENV, raising=False)
    assert warm.run_in_server("probe", []) is None
    monkeypatch.setenv(warm.ENV, "/nonexistent/socket")
    assert warm.run_in_server("probe", []) is None  # a server that is gone: run cold, do not fail


def test_streams_cwd_env_args_and_exit_status_are_the_callers(server):
    import json

    work, env = server
    proc = probe(work, {**env, "PROBE": "from the caller"}, "report", "3")
    out, err = proc.communicate("line on stdin\n", timeout=60)
    assert proc.returncode == 3
    report = json.loads(out.strip().splitlines()[-1])
    assert report["argv"] == ["report", "3"] and report["cwd"] == str(work)
    assert report["probe"] == "from the caller" and report["stdin"] == "line on stdin"
    assert report["ppid"] != proc.pid  # it ran in a child of the server, not in the command's own process
    assert err.strip().endswith("to stderr")


def test_distributed_workers_run_cold(server):
    import json

    work, env = server
    proc = probe(work, {**env, "LOCAL_RANK": "0"}, "report", "0")
    out, _ = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0 and json.loads(out.strip().splitlines()[-1])["pid"] == proc.pid


def test_ctrl_c_reaches_the_stage(server, tmp_path):
    work, env = server
    marker = tmp_path / "pid"
    proc = probe(work, env, "sleep", str(marker))
    _wait_for(marker)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT
    assert Path(f"{marker}.interrupted").read_text() == "yes"
    _wait_until_gone(int(marker.read_text()))


def test_a_killed_command_takes_its_stage_with_it(server, tmp_path):
    work, env = server
    marker = tmp_path / "pid"
    proc = probe(work, env, "sleep", str(marker))
    _wait_for(marker)
    child = int(marker.read_text())
    assert child != proc.pid
    proc.kill()  # SIGKILL: no chance to forward anything
    proc.communicate(timeout=30)
    _wait_until_gone(child)


def test_the_server_stops_with_its_block(tmp_path):
    with warm.server(dict(os.environ), preload=(), setup=None) as address:
        folder = Path(address).parent
        assert folder.stat().st_mode & 0o777 == 0o700  # only this user may ask it to run anything
    assert not folder.exists()


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _wait_until_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.05)
