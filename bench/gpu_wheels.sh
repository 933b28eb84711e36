#!/usr/bin/env bash
# Wheels for bench/gpu.sh on a GPU machine that reaches no package index (Python 3.12, x86-64): what the stages
# import and that machine's image lacks (it has torch, transformers, accelerate, safetensors, numpy, pyarrow,
# pyyaml, psutil, matplotlib, jinja2, tokenizers). Downloaded into .whl/ (git-ignored), ~50 MB, bitsandbytes most
# of it: with the working tree it stays under a device machine's 64 MiB transfer. flash-attn publishes no wheel on the index: the fa2 variant
# is reported as skipped there unless flash_attn is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl)
"${PIP[@]}" pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
  trl==1.16.0 peft==0.21.2 bitsandbytes==0.50.2 liger-kernel==0.8.5
ls -la .whl
