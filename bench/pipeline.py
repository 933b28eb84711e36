"""What `tunepipe run` costs on top of plain `dvc repro`, on the demo, cold, side by side.

    .venv/bin/python bench/pipeline.py [--workdir DIR] [--keep]

Two fresh copies of the project (git + dvc init, nothing built, empty caches):

- `dvc repro` in one: the stages alone (no MLflow store, so no tracking);
- `tunepipe run --json` in the other: the same stages driven by the Prefect flow, each tracked in MLflow (a fresh
  SQLite store), the registry decision, the artifacts;

then `tunepipe run` again with nothing changed (the no-op rerun). Prints both wall times and their ratio
(target: tunepipe run <= 1.10x dvc repro), the seconds inside the trainers (outputs/logs/train_*.measured.json),
each stage's start-up (process start -> its first useful work, from the stages' own "start-up" log lines) under
both, and the no-op rerun (target < 30 s). Prefect's one-time database creation (once per machine) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ("data", "stages", "flows", "tunepipe", "params.yaml", "dvc.yaml", "pyproject.toml", ".dvcignore", "prefect.yaml")
STARTUP = re.compile(r"\[([\w-]+)\] start-up ([\d.]+) s")
BIN = Path(sys.executable).parent


def prepare_project(path: Path) -> Path:
    for name in COPY:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            path.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, path / name)
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"],
                    [str(BIN / "dvc"), "config", "core.analytics", "false"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=path, check=True, capture_output=True, env=env)
    return path


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc


def trainer_seconds(project: Path) -> float:
    logs = (project / "outputs" / "logs").glob("train_*.measured.json")
    return sum(json.loads(p.read_text())["trainer_seconds"] for p in logs)


def startups(proc: subprocess.CompletedProcess) -> dict[str, float]:
    return {name: float(s) for name, s in STARTUP.findall(proc.stdout + proc.stderr)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tunepipe-bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.getenv("OMP_NUM_THREADS", "1"),
           "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    subprocess.run([str(BIN / "prefect"), "server", "database", "upgrade", "-y"], env=env, check=True,
                   capture_output=True)
    prefect_setup = time.perf_counter() - started

    plain = prepare_project(work / "dvc")
    dvc_wall, dvc_proc = timed([str(BIN / "dvc"), "repro"], plain, env)
    flow = prepare_project(work / "tunepipe")
    run_wall, run_proc = timed([str(BIN / "tunepipe"), "run", "--json"], flow, env)
    noop_wall, noop_proc = timed([str(BIN / "tunepipe"), "run", "--json"], flow, env)
    result = json.loads(run_proc.stdout.strip().splitlines()[-1])
    noop = json.loads(noop_proc.stdout.strip().splitlines()[-1])

    print(f"{'':34}{'dvc repro':>12}{'tunepipe run':>14}")
    print(f"{'cold run, all stages (s)':34}{dvc_wall:12.1f}{run_wall:14.1f}   ratio {run_wall / dvc_wall:.3f} "
          f"(target <= 1.10)")
    print(f"{'  inside the trainers (s)':34}{trainer_seconds(plain):12.1f}{trainer_seconds(flow):14.1f}")
    print(f"{'  everything else (s)':34}{dvc_wall - trainer_seconds(plain):12.1f}"
          f"{run_wall - trainer_seconds(flow):14.1f}")
    print("per-stage start-up, process start -> first useful work (s):")
    plain_startup, flow_startup = startups(dvc_proc), startups(run_proc)
    for name in flow_startup:
        print(f"  {name:32}{plain_startup.get(name, float('nan')):12.1f}{flow_startup[name]:14.1f}")
    print(f"  {'sum':32}{sum(plain_startup.values()):12.1f}{sum(flow_startup.values()):14.1f}")
    ran = [s["name"] for s in noop["stages"] if s["status"] == "ran"]
    print(f"no-op rerun (nothing changed): {noop_wall:.1f} s (stages that ran: {ran or 'none'}; target < 30 s)")
    print(f"one-time Prefect database setup: {prefect_setup:.1f} s (a machine's first flow run; not counted above)")
    print(f"registered: {result['model']}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work dir: {work}")


if __name__ == "__main__":
    main()
