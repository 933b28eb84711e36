"""Time to a params.yaml error: `tunepipe run` (validates before anything starts) vs the flow without validation.

    .venv/bin/python bench/validate.py [--repeats 3]

In a temporary copy of the project, params.yaml gets the issue-12 typo (`train.max_step`), an unknown dataset and a
lora_target the model lacks, one at a time. For each, the seconds until the process exits are measured for
`tunepipe run` (tunepipe/validate.py runs before the CLI execs into the flow) and for `python -m flows run` (what
`tunepipe run` ran before validation existed: the error came from inside the flow, after Prefect's start-up; here
without a git/DVC repository, so the flow stops at its first DVC call if params.yaml itself is valid). Prints both
side by side (best of --repeats for the CLI, one flow run each) with each command's exit code and error line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ("data", "stages", "flows", "tunepipe", "params.yaml")
CASES = {
    "typo train.max_step": lambda p: p["train"].update(max_step=3),
    "unknown dataset": lambda p: p["stages"]["sft"].update(dataset="demo_sfft"),
    "lora_target q_prj": lambda p: p["lora"].update(lora_target="q_prj"),
}


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, int, str]:
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")] or [""]
    return time.perf_counter() - started, proc.returncode, lines[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-validate-") as tmp:
        root = Path(tmp) / "project"
        for name in COPY:
            source = ROOT / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, root / name)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(Path(tmp) / "prefect"),
               "PYTHONPATH": str(root)}
        shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
        print(f"{'case':<22} {'tunepipe run':>13} {'flow only':>10}  errors")
        for case, change in CASES.items():
            params = yaml.safe_load(yaml.safe_dump(shipped))
            change(params)
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            runs = {"cli": [sys.executable, "-m", "tunepipe.cli", "run"],
                    "flow": [sys.executable, "-m", "flows", "run"]}
            best = {}
            for side, command in runs.items():
                results = [timed(command, root, env) for _ in range(args.repeats if side == "cli" else 1)]
                best[side] = min(results)
            print(f"{case:<22} {best['cli'][0]:>11.2f} s {best['flow'][0]:>8.1f} s  "
                  f"cli exit {best['cli'][1]}: {best['cli'][2][:90]}")
            print(f"{'':<22} {'':>13} {'':>10}  flow exit {best['flow'][1]}: {best['flow'][2][:90]}")


if __name__ == "__main__":
    main()
