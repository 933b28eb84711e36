"""Live token-level parity against LLaMA-Factory 0.9.5 (opt-in: `pytest -m lf_parity`).

Runs bench/parity.py's comparison for its sample cases (`Case.sample`: every stage, packing, neat packing,
mask_history, tool formats, mixing, pretraining with and without packing, the synthetic edge datasets) through LF's
real pipeline in the side venv (bench/lf_venv.sh; $LF_VENV, default /work/lf-venv) and through ours, uncached.
Skipped when the venv or ../shared is missing. The whole matrix: `.venv/bin/python bench/parity.py -j 2`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import LF_DEMO, ROOT

pytestmark = pytest.mark.lf_parity

LF_VENV = Path(os.environ.get("LF_VENV", "/work/lf-venv"))
LF_PYTHON = LF_VENV / "bin" / "python"
# The real `tunepipe data export` command, on a few cases (the sample above runs prepare() in-process).
CLI_CASES = ("sft/glaive_toolcall_en_demo/qwen/bpe_plain/c256/packing/max-samples=60",
             "dpo/synth_ranking_alpaca/qwen/bpe_plain/c128",
             "pt/c4_demo/default/bpe_bos/c256/no-packing/max-samples=60")


def _parity():
    name = "tunepipe_bench_parity"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "parity.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def matrix(request):
    if "lf_parity" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: run with `pytest -m lf_parity`")
    if not LF_PYTHON.is_file():
        pytest.skip(f"no LLaMA-Factory venv at {LF_VENV} (bench/lf_venv.sh builds it)")
    if not LF_DEMO.is_dir():
        pytest.skip("../shared/data/llamafactory-demo is not beside the project")
    parity = _parity()
    templates, skip = parity.common_templates(LF_PYTHON)
    return parity, parity.build_matrix(templates, skip=skip)


def _report(results) -> str:
    return "\n".join(f"{r.status:<10} {r.case.name}: {r.first_diff}" for r in results if not r.ok)


@pytest.mark.timeout(1800)
def test_sample_matches_llamafactory(matrix):
    parity, cases = matrix
    sample = [c for c in cases if c.sample]
    assert len(sample) >= 15
    results = parity.run_cases(sample, lf_python=LF_PYTHON, jobs=2, cache=None, ours_mode="batch")
    assert len(results) == len(sample)
    assert all(r.ok for r in results), "differences from LLaMA-Factory 0.9.5:\n" + _report(results)


@pytest.mark.timeout(900)
def test_cli_export_matches_llamafactory(matrix):
    parity, cases = matrix
    chosen = [c for c in cases if c.name in CLI_CASES]
    assert len(chosen) == len(CLI_CASES), "CLI_CASES names drifted from bench/parity.py's matrix"
    results = parity.run_cases(chosen, lf_python=LF_PYTHON, jobs=2, cache=None, ours_mode="cli")
    assert all(r.ok for r in results), "`tunepipe data export` differs from LLaMA-Factory 0.9.5:\n" + _report(results)
