#!/usr/bin/env bash
# GPU readiness check (issue 7): on ONE GPU, in at most ~9 minutes, from the project files alone:
#   1. a venv that sees the machine's CUDA torch (no network needed; missing pure-Python packages come from
#      a wheel folder made by scripts/gpu-wheels.sh, else from the index if reachable, else the step says what is
#      missing);
#   2. `oprd-ci bench update` at the paper's shape (Qwen2 hidden 1536, ff 8960, 28 layers, heads 12/2, vocab
#      151,936; 1 x (1,024 prompt + 16,384 response) tokens; bf16 autocast; activation checkpointing; fused AdamW)
#      for oprd (layers all, last_k 2000) / opd_sampled / opd_topk (16) / floor, memory = CUDA ∆peak (§8);
#   3. `oprd-ci bench step --engine hf` and `--engine vllm` (fails gracefully when vLLM or the flag is missing);
#      `oprd-ci bench evaluate` (the evaluate stage with evaluate.engine hf then vllm, greedy, on the embedded
#      teacher: rows must be equal; < 1 min) when vLLM imports and the flag exists;
#   4. the CUDA variants of the resume, NaN and micro-batch tests (the trainer picks CUDA when it is visible) and
#      the vLLM tests when vLLM imports;
#   4b. the teacher pool (teacher.placement: ray, issue 20): bitwise parity of a Ray replica sharing the GPU with
#      the in-process teacher (oprd), and the identity/plan refusal, on a fresh local Ray (< 1 min);
#   5. $OUT_DIR/summary.md (a table per step + the bench tables) and summary.json.
#
# Usage:  bash scripts/gpu-check.sh [--out DIR] [--wheels DIR] [--python PY] [--venv DIR] [--cpu-smoke]
#   --out      where results go (default: $OUT if set, else artifacts/gpu-check); at most 7 files are written
#   --wheels   folder of wheels to install into the venv (default: .whl when it exists)
#   --python   interpreter that holds torch (default: python3)
#   --cpu-smoke  dry run on CPU at tiny shapes (same steps and files; the CUDA-only tests skip)
# Exit status: 0 when every step that ran passed (skipped steps do not fail the check), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR="${OUT:-$ROOT/artifacts/gpu-check}"
WHEELS=""
HOST_PY="${PYTHON:-python3}"
VENV="${GPU_CHECK_VENV:-/tmp/oprd-gpu-check-venv}"
SMOKE=0
BUDGET_S=480
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --python) HOST_PY="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -z "$WHEELS" ] && [ -d "$ROOT/.whl" ] && WHEELS="$ROOT/.whl"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-check.log"
STEPS="$(mktemp)"
: >"$LOG"
START=$(date +%s)
export PYTHONPATH="$ROOT" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYX="$VENV/bin/python"

log() { echo "[gpu-check $(($(date +%s) - START))s] $*" | tee -a "$LOG" >&2; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"; }  # name status seconds note

# run_step NAME LIMIT_S CMD...: runs CMD under `timeout`, appends its output to the log, records the outcome.
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    record "$name" skipped 0 "time budget spent"; log "$name: skipped (time budget spent)"; return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name: start (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  echo "===== $name: $*" >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  if [ "$rc" -eq 0 ]; then
    record "$name" ok "$dt" ""
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" timeout "$dt" "killed after ${limit}s"
  else
    record "$name" failed "$dt" "exit $rc: $(grep -v '^\s*$' "$LOG" | grep -v '^USDT' | tail -1 | cut -c1-160)"
  fi
  log "$name: $(tail -1 "$STEPS" | cut -f2) in ${dt}s"
}

# ------------------------------------------------------------------------------------------------- 1. venv
setup_venv() {
  "$HOST_PY" -c 'import torch' || { echo "error: $HOST_PY has no torch; pass --python"; return 1; }
  [ -x "$PYX" ] || "$HOST_PY" -m venv "$VENV" || return 1
  # The venv sees the host interpreter's packages (CUDA torch, maybe itself in a venv) through a .pth file
  # appended after its own site-packages, so wheels installed here take precedence.
  local vsite
  vsite=$("$PYX" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$HOST_PY" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() + sys.path if p.endswith("-packages")))' \
    | sort -u >"$vsite/zz_host_site_packages.pth"
  if [ -n "$WHEELS" ]; then
    echo "installing wheels from $WHEELS"
    "$PYX" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl || return 1
  fi
  local need="torch transformers pydantic yaml typer rich tqdm safetensors tokenizers numpy pandas psutil pytest"
  local missing
  missing=$("$PYX" - $need <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
  if [ -n "$missing" ]; then
    echo "missing: $missing; trying the package index (60 s)"
    local pkgs=${missing//yaml/pyyaml}
    timeout 60 "$PYX" -m pip install -q $pkgs || {
      echo "error: cannot install $pkgs here (no index, no wheels): run scripts/gpu-wheels.sh on a networked" \
        "machine and pass --wheels DIR"; return 1; }
  fi
  "$PYX" - "$SMOKE" <<'EOF'
import json, sys
import torch, transformers, pydantic
smoke = sys.argv[1] == "1"
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "pydantic": pydantic.__version__, "python": sys.version.split()[0],
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
try:
    import vllm
    info["vllm"] = vllm.__version__
except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
    info["vllm"] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
print(json.dumps(info))
if not smoke and not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA device (use --cpu-smoke for a CPU dry run)")
EOF
}

BENCH=("$PYX" -c 'import sys; from oprd_ci.bench_cli import bench_app; sys.argv[0] = "oprd-ci bench"; bench_app()')
if [ "$SMOKE" -eq 1 ]; then
  DEV=cpu
  UPDATE_SHAPE=(--vocab 2000 --hidden 32 --intermediate 64 --layers 2 --heads 4 --kv-heads 2 --seqs 1
    --prompt-len 16 --response-len 64 --oprd-k 32 --rounds 1 --threads 2)
  # head size 32: the smallest vLLM's CPU attention kernels take (the update shape above is HF-only)
  STEP_SHAPE=(--vocab 2000 --hidden 64 --intermediate 128 --layers 2 --heads 2 --kv-heads 1 --prompts 2 --n 1
    --max-new-tokens 8 --rounds 1 --threads 2)
  # generous: a shared 2-core box imports torch slowly; the 8-minute budget is for the GPU run
  L_SETUP=300; L_UPDATE=300; L_STEP=300; L_TESTS=600; L_POOL=600; L_EVAL=300; BUDGET_S=2400
else
  DEV=cuda
  UPDATE_SHAPE=(--vocab 151936 --hidden 1536 --intermediate 8960 --layers 28 --heads 12 --kv-heads 2 --seqs 1
    --prompt-len 1024 --response-len 16384 --oprd-k 2000 --rounds 2)
  STEP_SHAPE=(--rounds 2)
  # the whole GPU run stays within BUDGET_S=480 (8 minutes); a step that would pass it is recorded as skipped
  L_SETUP=90; L_UPDATE=180; L_STEP=45; L_TESTS=90; L_POOL=45; L_EVAL=45
fi

export -f setup_venv
export HOST_PY VENV PYX WHEELS SMOKE
run_step setup "$L_SETUP" bash -c setup_venv
if [ "$(tail -1 "$STEPS" | cut -f2)" != ok ]; then
  for s in bench-update bench-step-hf bench-step-vllm bench-eval-engines tests-cuda tests-teacher-pool tests-vllm; do record "$s" skipped 0 "no environment"; done
else
  run_step bench-update "$L_UPDATE" "${BENCH[@]}" update --out "$OUT_DIR/update-paper.json" "${UPDATE_SHAPE[@]}" \
    --methods oprd,opd_sampled,opd_topk,floor --top-k 16 --oprd-layers all --oprd-positions last_k \
    --dtype bf16 --checkpointing --optimizer adamw-fused --device "$DEV" --quiet
  if "${BENCH[@]}" step --help 2>/dev/null | grep -q -- '--engine'; then
    run_step bench-step-hf "$L_STEP" "${BENCH[@]}" step --out "$OUT_DIR/step-hf.json" "${STEP_SHAPE[@]}" \
      --methods oprd,opd_topk --engine hf --quiet
    run_step bench-step-vllm "$L_STEP" "${BENCH[@]}" step --out "$OUT_DIR/step-vllm.json" "${STEP_SHAPE[@]}" \
      --methods oprd,opd_topk --engine vllm --quiet
  else
    run_step bench-step-hf "$L_STEP" "${BENCH[@]}" step --out "$OUT_DIR/step-hf.json" "${STEP_SHAPE[@]}" \
      --methods oprd,opd_topk --quiet
    record bench-step-vllm skipped 0 "this checkout's bench step has no --engine flag (vLLM engine not merged)"
  fi
  # The evaluate-engine check: the evaluate stage's code with evaluate.engine hf, then vllm (one engine, in-process),
  # greedy on the embedded teacher: problems/s of each and whether the per-problem rows are equal (they must be).
  if ! "${BENCH[@]}" evaluate --help 2>/dev/null | grep -q -- '--engines'; then
    record bench-eval-engines skipped 0 "this checkout's bench has no evaluate command"
  elif ! "$PYX" -c 'import vllm' >/dev/null 2>&1; then
    record bench-eval-engines skipped 0 "vllm does not import"
  else
    run_step bench-eval-engines "$L_EVAL" "${BENCH[@]}" evaluate --out "$OUT_DIR/eval-engines.json" \
      --engines hf,vllm --limit 64 --k 2 --temperature 0 --quiet
    if [ "$(tail -1 "$STEPS" | cut -f2)" = ok ] && ! "$PYX" -c '
import json, sys
rows = json.load(open(sys.argv[1]))["engines"]
sys.exit(0 if all(r["rows_equal_first_engine"] for r in rows) else 1)' "$OUT_DIR/eval-engines.json"; then
      record bench-eval-parity failed 0 "greedy per-problem rows differ between evaluate.engine hf and vllm"
    fi
  fi
  # CUDA variants: the same tests; Trainer/init_distributed pick the GPU whenever torch sees one.
  run_step tests-cuda "$L_TESTS" "$PYX" -m pytest -q -p no:cacheprovider -o addopts="-ra -p tiny_pair" \
    tests/trainer/test_trainer_train.py tests/trainer/test_trainer_microbatch.py \
    -k "resume_reproduces or non_finite or cuda"
  if "$PYX" -c 'import ray' >/dev/null 2>&1 && [ -f tests/trainer/test_teacher_pool.py ]; then
    run_step tests-teacher-pool "$L_POOL" "$PYX" -m pytest -q -p no:cacheprovider -o addopts="-ra -p tiny_pair" \
      "tests/trainer/test_teacher_pool.py::test_ray_teacher_matches_local_bitwise[oprd]" \
      tests/trainer/test_teacher_pool.py::test_pool_refuses_another_teacher_and_a_foreign_layer_plan
  else
    record tests-teacher-pool skipped 0 "ray does not import or no teacher-pool tests in this checkout"
  fi
  vllm_tests=$(ls tests/trainer/test_*vllm*.py tests/*/test_*vllm*.py 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -z "$vllm_tests" ]; then
    record tests-vllm skipped 0 "no vLLM test files in this checkout"
  elif ! "$PYX" -c 'import vllm' >/dev/null 2>&1; then
    record tests-vllm skipped 0 "vllm does not import (its wheel cannot be carried to an offline machine)"
  else
    run_step tests-vllm "$L_TESTS" "$PYX" -m pytest -q -p no:cacheprovider -o addopts="-ra -p tiny_pair" $vllm_tests
  fi
fi

# ---------------------------------------------------------------------------------------------- 5. summary
"$PYX" - "$STEPS" "$OUT_DIR" "$SMOKE" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" <<'EOF' || {
import json, sys
from pathlib import Path

steps_tsv, out, smoke, when = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
steps = []
for line in Path(steps_tsv).read_text().splitlines():
    name, status, secs, note = (line.split("\t") + [""] * 4)[:4]
    steps.append({"step": name, "status": status, "seconds": int(secs or 0), "note": note})
lines = [f"# GPU readiness check ({'CPU smoke run' if smoke else 'GPU'}), {when}", "",
         "| step | status | seconds | note |", "|---|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['note'].replace('|', '/')} |" for s in steps]
benches = {}
try:
    from oprd_ci.bench_cli import markdown
except Exception as exc:  # noqa: BLE001
    markdown = None
    lines += ["", f"(bench tables unavailable: {exc})"]
for name in ("update-paper", "step-hf", "step-vllm"):
    f = out / f"{name}.json"
    if f.is_file():
        benches[name] = json.loads(f.read_text())
        if markdown is not None:
            lines += ["", f"## {name}", "", markdown(benches[name])]
f = out / "eval-engines.json"
if f.is_file():
    try:
        from pipelines.bench_evaluate import evaluate_bench_markdown
        lines += ["", "## eval-engines", "", evaluate_bench_markdown(json.loads(f.read_text()))]
    except Exception as exc:  # noqa: BLE001
        lines += ["", f"(eval-engines table unavailable: {exc})"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
(out / "summary.json").write_text(json.dumps({"when": when, "smoke": smoke, "steps": steps}, indent=2) + "\n")
print("\n".join(lines))
EOF
  # no usable Python: the step table alone
  { echo "| step | status | seconds | note |"; echo "|---|---|---|---|"; sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$STEPS"; } \
    | tee "$OUT_DIR/summary.md"
}
log "done in $(($(date +%s) - START))s; results in $OUT_DIR"
failed=$(cut -f2 "$STEPS" | grep -c -E '^(failed|timeout)$')
rm -f "$STEPS"
[ "$failed" -eq 0 ]
