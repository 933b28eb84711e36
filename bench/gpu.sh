#!/usr/bin/env bash
# The GPU check: Qwen2.5-0.5B- and 1.5B-shaped random models through prepare -> train-sft -> merge-sft -> train-dpo
# (the real stages), per variant sdpa / fa2 / liger / 4bit; prints tokens/s, MFU, peak memory, merge |dlogit| and
# each stage's wall time (bench/gpu_check.py has the formulas). Without a GPU it runs the tiny shape (what CI does).
#
#   bash bench/gpu.sh                                  # GPU: both shapes, all variants (~10 min on one H200)
#   bash bench/gpu.sh --shapes 0.5b                    # one shape per command to stay under a 10-minute cap
#   bash bench/gpu.sh --shapes tiny --variants sdpa    # CPU smoke (tests/test_gpu_check.py)
#
# A GPU machine that cannot download: `bash bench/gpu_wheels.sh` here first puts the packages the stages need and
# that machine's image lacks into .whl/ (git-ignored); this script installs them into a private target dir when
# its Python lacks them.
# Python: $PYTHON, else .venv/bin/python when present, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import trl, pydantic, datasets, bitsandbytes" 2>/dev/null; then
  SITE="${TMPDIR:-/tmp}/tunepipe-gpu-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
