#!/usr/bin/env bash
# Download, on a machine WITH PyPI access, the wheels scripts/gpu-check.sh needs on an offline GPU machine whose
# image already holds CUDA torch, numpy, pyyaml, typer, rich, tqdm, safetensors, tokenizers, pytest, psutil
# (Python 3.12). Missing there: the pydantic stack; transformers is pinned to this project's version.
# vLLM is NOT fetched: its wheel (~400 MB) exceeds what can be carried; gpu-check.sh degrades without it.
#
#   bash scripts/gpu-wheels.sh [DIR]      # default DIR: .whl (add "/.whl/" to .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
mkdir -p "$dir"
py="${GPU_PYTHON_VERSION:-3.12}"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${plat[@]}" \
  -d "$dir" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection transformers==5.24.0
ls -la "$dir"
