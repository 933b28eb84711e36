"""Warm starts for short-lived Python commands: import the heavy libraries once, fork a fresh process per command.

A pipeline stage is a fresh `python -m stages.<name>` process, and on a small model most of its life goes to importing
torch, transformers, peft, trl, datasets and mlflow (~6 s, every stage, every run). `server()` starts a process that
imports them once and listens on a Unix socket. A command that finds the socket in TUNEPIPE_WARM_SOCKET calls
`run_in_server(module, argv)`: it hands its stdin/stdout/stderr (the file descriptors themselves), working directory,
environment and arguments to the server, which forks a child that runs the module as `python -m` would, in that
state. The child sends its exit status back and the command exits with it; signals the command receives (Ctrl-C, a
supervisor stopping it) are forwarded to the child, and a child whose command goes away is terminated.

To the program that started the command (DVC) nothing changes: same command line, output, exit status and files.
Without a server (`dvc repro` by hand, a distributed launcher) the command simply runs by itself.

The idea is multiprocessing's forkserver (preload, then fork per job), extended to run arbitrary modules for an
unrelated client process. Fork safety: the server only imports (no torch ops, no CUDA, no open database
connections), which is the state torch's own DataLoader workers fork from. The socket lives in a fresh 0700 temp
directory, so only the same user can ask the server to run something. The server is started with the environment the
commands will get, so settings libraries read at import time (HF_HUB_OFFLINE, OMP_NUM_THREADS) are the same.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)

ENV = "TUNEPIPE_WARM_SOCKET"
# What the training path imports; each entry is "module" or "module:attribute" (lazy attributes load submodules).
PRELOAD = (
    "torch", "transformers:AutoModelForCausalLM", "transformers:Trainer", "transformers:TrainingArguments",
    "peft:PeftModel", "peft:LoraConfig", "trl:SFTTrainer", "trl:DPOTrainer", "trl:KTOTrainer", "datasets:Dataset",
    "mlflow", "mlflow:MlflowClient", "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store", "matplotlib.pyplot",
)
# Open the MLflow store before forking (created once, connections closed): stages then skip ~1 s each.
SETUP = "tunepipe.tracking:prepare_for_fork"
_INT = struct.Struct("!i")
_in_server = False  # set in a forked child: it runs its module itself (its subprocesses may use the server)
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_DISTRIBUTED = ("LOCAL_RANK", "WORLD_SIZE", "RANK")  # torchrun/accelerate workers are started by their launcher


# -- the parent side --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def server(env: dict[str, str] | None = None, preload: Sequence[str] = PRELOAD,
           setup: str | None = SETUP) -> Iterator[str | None]:
    """Run a warm server for the duration of the block; yields its socket path (None if it could not start, in
    which case commands run cold). `env` is the environment the commands will run with; `setup` ("module:function")
    runs in the server after the imports, before the first fork."""
    folder = tempfile.mkdtemp(prefix="tunepipe-warm-")
    path = os.path.join(folder, "socket")
    env = {**(env if env is not None else os.environ), "MPLBACKEND": "Agg"}
    proc = subprocess.Popen([sys.executable, "-m", "tunepipe.warm", "serve", path, setup or "-", *preload], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        # the socket exists before the imports start: early commands wait in the accept queue, not cold
        ready = proc.stdout.readline().strip() == b"listening"
        if not ready:
            log.warning("warm server did not start (exit %s); stages start cold", proc.poll())
        yield path if ready else None
    finally:
        proc.stdin.close()  # the server exits when its stdin closes (also when this process dies)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)


def serve(path: str, setup: str | None, preload: Sequence[str]) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("listening", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing else goes to the starter's pipe
    for item in preload:
        module, _, attribute = item.partition(":")
        try:
            imported = __import__(module, fromlist=["_"])
            if attribute:
                getattr(imported, attribute)
        except Exception as err:  # a missing optional library only means that command starts colder
            print(f"warm: could not preload {item}: {err}", file=sys.stderr)
    if setup:
        module, _, function = setup.partition(":")
        try:
            getattr(__import__(module, fromlist=["_"]), function)()
        except Exception as err:
            print(f"warm: {setup} failed: {err}", file=sys.stderr)
    gc.collect()
    gc.freeze()  # children never walk (and so never copy) the preloaded objects in their collections
    children: set[int] = set()
    while True:
        readable, _, _ = select.select([listener, 0], [], [], 1.0)
        with contextlib.suppress(ChildProcessError):
            while (pid := os.waitpid(-1, os.WNOHANG)[0]) > 0:
                children.discard(pid)
        if 0 in readable and not os.read(0, 1024):
            break
        if listener in readable:
            conn, _ = listener.accept()
            if _peer_pid(conn) in children:  # a child asking to run itself again: refused, it runs on its own
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                _child(conn)  # never returns
            children.add(pid)
            conn.close()
    listener.close()


def _peer_pid(conn: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):  # Linux only; elsewhere the module flag alone prevents recursion
        return None
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]


# -- the forked child --------------------------------------------------------------------------------------------
def _child(conn: socket.socket) -> None:
    global _in_server
    _in_server = True
    code = 1
    try:
        size, fds = _receive_request_head(conn)
        request = json.loads(_recv_exact(conn, size))
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
        for sig in _FORWARDED:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        import random

        random.seed()  # a fresh process would not share its random state with its siblings
        conn.sendall(_INT.pack(os.getpid()))
        done = threading.Event()
        threading.Thread(target=_watch_client, args=(conn, done), daemon=True).start()
        code = _run_module(request["module"], request["argv"], request["cwd"])
        done.set()
        conn.sendall(_INT.pack(code))
    except BaseException:  # noqa: BLE001 - the child must never fall back into the server loop
        with contextlib.suppress(Exception):
            import traceback

            traceback.print_exc()
    finally:
        os._exit(code)


def _watch_client(conn: socket.socket, done: threading.Event) -> None:
    """The command that asked for this run went away (killed): stop, as its own child process would have."""
    with contextlib.suppress(OSError):
        conn.recv(1)
    if not done.is_set():
        os.kill(os.getpid(), signal.SIGTERM)


def _run_module(module: str, argv: list[str], cwd: str) -> int:
    """`python -m module argv...` in this process; returns the exit status Python would have exited with."""
    import atexit
    import runpy

    sys.argv = [module, *argv]
    sys.path[0] = cwd  # `python -m` puts the working directory first
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - reported like the interpreter would
        import traceback

        traceback.print_exc()
        code = 1
    code &= 0xFF  # what the operating system keeps of it
    for thread in threading.enumerate():  # what interpreter shutdown does before atexit
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


# -- the command side --------------------------------------------------------------------------------------------
def run_in_server(module: str, argv: Sequence[str]) -> int | None:
    """Run `python -m module argv` in the warm server named by TUNEPIPE_WARM_SOCKET and return its exit status;
    None when there is no usable server (the caller then runs the module itself)."""
    path = os.environ.get(ENV)
    if not path or _in_server or any(name in os.environ for name in _DISTRIBUTED):
        return None
    request = json.dumps({"module": module, "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        socket.send_fds(conn, [_INT.pack(len(request))], _std_fds())
        conn.sendall(request)
        (pid,) = _INT.unpack(_recv_exact(conn, 4))
    except OSError:
        conn.close()
        return None  # nothing ran yet: safe to run cold
    for sig in _FORWARDED:
        signal.signal(sig, lambda number, _frame: os.kill(pid, number))
    try:
        (code,) = _INT.unpack(_recv_exact(conn, 4))
    except OSError:
        print(f"error: the stage process (pid {pid}) ended without an exit status (killed?)", file=sys.stderr)
        code = 1
    conn.close()
    return code


def _std_fds() -> list[int]:
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:  # a closed standard stream: the child gets /dev/null, as a fresh process would fail less
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _receive_request_head(conn: socket.socket) -> tuple[int, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, _INT.size, 3)
    if len(data) < _INT.size:
        data += _recv_exact(conn, _INT.size - len(data))
    if len(fds) != 3:
        raise OSError(f"expected 3 file descriptors, got {len(fds)}")
    return _INT.unpack(data)[0], fds


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(left)
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


if __name__ == "__main__":
    # Run the importable module's functions, not this `__main__` copy: the forked children's flag must be the one
    # `from tunepipe import warm` sees, or a stage would hand itself to the server again.
    from tunepipe import warm

    if sys.argv[1:2] != ["serve"] or len(sys.argv) < 4:
        sys.exit("usage: python -m tunepipe.warm serve SOCKET SETUP|- [MODULE[:ATTRIBUTE] ...]")
    warm.serve(sys.argv[2], None if sys.argv[3] == "-" else sys.argv[3], sys.argv[4:])
    sys.stderr.flush()
    os._exit(0)  # tearing down torch & co. takes a second and there is nothing to save
