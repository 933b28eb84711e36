#!/usr/bin/env bash
# Build the side virtualenv that runs LLaMA-Factory 0.9.5's *text* data pipeline on CPU.
# It is the reference ("oracle") for token-level parity; tunepipe itself never imports it.
#
# Usage:   bash bench/lf_venv.sh [VENV_DIR]          (default: ${LF_VENV:-/work/lf-venv})
# Then:    $VENV_DIR/bin/python bench/lf_oracle.py --help
#
# Idempotent: re-running re-checks pins (pip no-ops when satisfied) and re-creates the stub.
#
# Why the pins: llamafactory 0.9.5 declares transformers<=5.6.0, datasets<=4.0.0, peft<=0.18.1,
# trl<=0.24.0, accelerate<=1.11.0; a real `llamafactory-cli train` install would resolve to those
# upper bounds, so we pin them exactly. llamafactory itself goes in with --no-deps because its
# declared deps drag in gradio/modelscope/av/torchvision/torchaudio (CUDA-sized, unused for text).
#
# Traps:
#  * torch must be installed FIRST from the local CPU wheel; any other torch spec pulls GBs of CUDA.
#    The later installs use a constraint file pinning torch==2.13.0 so nothing can replace it.
#  * llamafactory.data.mm_plugin does `import torchaudio` at module level and there is no CPU
#    wheel: we install an empty stub package via a .pth file (text processing never calls it).
set -euo pipefail

VENV="${1:-${LF_VENV:-/work/lf-venv}}"
PY="${LF_PYTHON:-python3.11}"
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[lf_venv] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

# 1) torch from the local CPU wheel (no index lookup for torch itself).
"${PIP[@]}" install -q --find-links "$TORCH_WHEEL_DIR" "torch==2.13.0"

CONSTRAINTS="$VENV/lf-constraints.txt"
cat >"$CONSTRAINTS" <<'EOF'
torch==2.13.0
EOF

# 2) LF's text-pipeline dependencies, at llamafactory 0.9.5's upper bounds.
"${PIP[@]}" install -q --find-links "$TORCH_WHEEL_DIR" -c "$CONSTRAINTS" \
  "transformers==5.6.0" \
  "datasets==4.0.0" \
  "peft==0.18.1" \
  "trl==0.24.0" \
  "accelerate==1.11.0" \
  jinja2 sentencepiece protobuf tiktoken omegaconf fire pyyaml numpy pillow packaging \
  safetensors einops pydantic scipy pandas

# 3) llamafactory itself without its (GPU/UI-heavy) dependency set.
"${PIP[@]}" install -q --no-deps "llamafactory==0.9.5"

# 4) Empty torchaudio stub, importable in every process of this venv via a .pth entry.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$VENV/stubs/torchaudio"
cat >"$VENV/stubs/torchaudio/__init__.py" <<'EOF'
"""Empty stand-in for torchaudio (no CPU wheel available). LLaMA-Factory's text path never uses it."""
__version__ = "0.0.0+stub"
EOF
echo "$VENV/stubs" >"$SITE/lf_torchaudio_stub.pth"

# 5) Smoke test: the modules the oracle needs import cleanly.
HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import llamafactory.data.loader  # noqa: F401
import llamafactory.hparams  # noqa: F401
for pkg in ("llamafactory", "torch", "transformers", "datasets", "peft", "trl", "accelerate", "tokenizers"):
    print(f"[lf_venv] {pkg}=={md.version(pkg)}")
print("[lf_venv] import llamafactory.data.loader: OK")
EOF
"${PIP[@]}" freeze >"$VENV/lf-freeze.txt"  # record of exactly what this run resolved
echo "[lf_venv] ready: $VENV (freeze in $VENV/lf-freeze.txt)"
