"""bench/gpu.sh on CPU with the tiny shape: the check a GPU machine runs keeps working, and its output keeps the
format a reader (and this test) relies on: a header line, the column line, one table row and one RESULT line per
variant, with figures for what ran and the stage's own one-line reason for what this machine cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

COLUMNS = ["shape", "variant", "status", "tokens_per_second", "mfu", "peak_mem_mb", "merge_max_dlogit", "prepare_s",
           "train_sft_s", "merge_sft_s", "train_dpo_s"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_runs_on_cpu_and_prints_its_table(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the check runs the real shapes (minutes)")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--shapes", "tiny", "--variants", "sdpa,fa2,liger",
                           "--sft-steps", "2", "--dpo-steps", "1", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# tunepipe gpu check | device cpu | torch ") and "TFLOP/s" in lines[0]
    assert lines[1].split(" | ") == COLUMNS
    table = [line.split(" | ") for line in lines[2:] if line.startswith("tiny | ")]
    assert [row[1] for row in table] == ["sdpa", "fa2", "liger"] and all(len(row) == len(COLUMNS) for row in table)
    results = {r["variant"]: r for r in (json.loads(line[7:]) for line in lines if line.startswith("RESULT "))}
    assert list(results) == ["sdpa", "fa2", "liger"]

    ran = results["sdpa"]
    assert ran["status"] == "ok" and ran["shape"] == "tiny"
    assert ran["tokens_per_second"] > 0 and 0 < ran["mfu"] < 1 and ran["peak_mem_mb"] > 0
    assert ran["merge_max_dlogit"] < 1e-4  # merged model = base + adapter
    assert all(ran[key] > 0 for key in ("prepare_s", "train_sft_s", "merge_sft_s", "train_dpo_s"))
    # FLOPs per token = 4 N + 12 layers d_model s (2 layers, d_model 64 in the tiny shape)
    attention = 12 * 2 * 64  # per attended token; mean_attended_tokens is printed rounded to 0.1
    expected = 4 * ran["matmul_params"] + attention * ran["mean_attended_tokens"]
    assert abs(ran["flops_per_token"] - expected) <= attention * 0.05 + 1
    assert results["fa2"]["status"].startswith("skipped: ") and "CUDA GPU" in results["fa2"]["status"]
    assert results["liger"]["status"].startswith("skipped: ") and "CUDA GPU" in results["liger"]["status"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["device"] == "cpu" and [r["variant"] for r in saved["rows"]] == ["sdpa", "fa2", "liger"]
