"""Orchestration overhead of `tunepipe run` on the demo: wall time minus the time spent inside the trainers.

    .venv/bin/python bench/pipeline.py [--workdir DIR] [--keep]

Copies the project to a fresh directory (git + dvc init, empty MLflow store, a fresh PREFECT_HOME whose database is
created first and timed apart: Prefect does that once per machine), runs `tunepipe run --json` cold, then again with
nothing changed, and prints: cold wall time, seconds inside the trainers (metrics/train_*.json), the
overhead (everything else: Prefect, DVC, process start-up and imports, tokenization, merges, evaluation, registry)
and its share of the cold run, plus the warm (nothing-to-do) run's wall time. Target: overhead < 25% of the cold
run; warm run < 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ("data", "stages", "flows", "tunepipe", "params.yaml", ".dvcignore", "prefect.yaml")


def prepare_project(work: Path) -> Path:
    project = work / "project"
    for name in COPY:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            project.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, project / name)
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True, env=env)
    return project


def timed_run(project: Path, env: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "tunepipe"), "run", "--json"], cwd=project, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"tunepipe run failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tunepipe-bench-pipeline-"))
    project = prepare_project(work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.getenv("OMP_NUM_THREADS", "1"),
           "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TUNEPIPE_CACHE": str(work / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    # Prefect creates its own database on a machine's first flow run, once (~8 s here): timed apart, as setup
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"], env=env,
                   check=True, capture_output=True)
    prefect_setup = time.perf_counter() - started

    cold, result = timed_run(project, env)
    train_metrics = [json.loads(p.read_text()) for p in (project / "metrics").glob("train_*.json")]
    trainer = sum(m["trainer_seconds"] for m in train_metrics)  # all of trainer.train() + its final evaluate
    steps = sum(m["seconds"] for m in train_metrics)  # the optimizer steps alone
    warm, warm_result = timed_run(project, env)
    stages = {s["name"]: s["seconds"] for s in result["stages"]}
    print(f"cold run (all stages)           {cold:8.1f} s")
    print(f"  inside the trainers           {trainer:8.1f} s  (trainer.train() + final evaluate; "
          f"optimizer steps alone {steps:.1f} s)")
    print(f"  orchestration overhead        {cold - trainer:8.1f} s  = {100 * (cold - trainer) / cold:.0f}% "
          f"of the cold run (target < 25%)")
    for name, seconds in stages.items():
        print(f"    {name:<14} {seconds:7.1f} s")
    ran = [s["name"] for s in warm_result["stages"] if s["status"] == "ran"]
    print(f"one-time Prefect database setup  {prefect_setup:8.1f} s  (a machine's first flow run; not in the above)")
    print(f"warm run (nothing changed)      {warm:8.1f} s  (stages that ran: {ran or 'none'}; target < 30 s)")
    print(f"registered: {result['model']}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work dir: {work}")


if __name__ == "__main__":
    main()
