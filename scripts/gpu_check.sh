#!/usr/bin/env bash
# The one prepared GPU check: build the extension against the machine's CUDA torch, run every CUDA-marked test, the
# Triton kernels compiled (not interpreted) and the GPU benchmark suite's headline cases, in one call of at most
# ~8 minutes, with every log and JSON under one folder.
#
#   scripts/gpu_check.sh [--out DIR]      # on a GPU machine, with its own python3 (torch + triton + CUDA toolkit)
#   scripts/gpu_check.sh --dry-run        # the same steps on CPU (tiny shapes, GPU-only parts skipped with a reason)
#   make gpu-check                        # = the first; .ci/run runs the dry run so the script cannot rot
#
# Output (at most 8 files, two folders deep, as the device tool brings back): summary.json (each step: status, rc,
# seconds, why skipped), check.log (every step's output, in order), env.txt (GPU, driver, versions), bench/ (the
# benchmark JSON with provenance and its rendered README.md). Exit status 0 when every step passed or was skipped
# for a stated reason, else 1. PY overrides the python (default: .venv/bin/python for --dry-run, else python3).
set -uo pipefail

cd "$(dirname "$0")/.."
DRY=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$OUT" ]; then
    if [ $DRY = 1 ]; then OUT=/tmp/ppt-fast-gpu-check-dry; else OUT=${OUT_DIR:-gpu-check-out}; fi
fi
if [ -z "${PY:-}" ]; then
    if [ $DRY = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
rm -rf "$OUT" && mkdir -p "$OUT/bench" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
LOG="$OUT/check.log"
STEPS="$OUT/.steps"
: > "$LOG"
: > "$STEPS"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

note() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run with a time limit, append its output to check.log, record status and duration.
step() {
    local name=$1 limit=$2
    shift 2
    note "== $name (limit ${limit}s): $*"
    local t=$(date +%s)
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local status=passed
    # pytest: 5 = nothing collected/selected (every case deselected), not a failure of the code under test
    if [ $rc = 124 ]; then status=timed_out; elif [ $rc != 0 ] && [ $rc != 5 ]; then status=failed; fi
    printf '%s\t%s\t%s\t%s\t\n' "$name" "$status" "$rc" "$(( $(date +%s) - t ))" >> "$STEPS"
    note "== $name: $status (rc $rc)"
}

skip() {
    note "== $1: skipped: $2"
    printf '%s\tskipped\t\t0\t%s\n' "$1" "$2" >> "$STEPS"
}

# ---- the machine --------------------------------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)"
    echo "python: $PY"
    "$PY" - <<'EOF'
import platform, torch
print("platform:", platform.platform())
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, "SMs:", p.multi_processor_count, "memory GiB:", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton:", triton.__version__)
except ImportError:
    print("triton: not installed")
for mod in ("transformers", "peft", "pytest", "pytest_benchmark", "safetensors"):
    try:
        print(f"{mod}:", __import__(mod).__version__)
    except Exception as e:  # noqa: BLE001
        print(f"{mod}: missing ({type(e).__name__})")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    command -v nvcc >/dev/null && nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$LOG"
HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ $DRY = 0 ] && [ "$HAS_GPU" != 1 ]; then
    note "no CUDA device is visible to $PY: run with --dry-run on a CPU machine"
    exit 1
fi

# ---- build ----------------------------------------------------------------------------------------------------------
if [ $DRY = 1 ] && "$PY" -c "import ppt_fast._C" 2>/dev/null; then
    skip build "dry run: the CPU extension is already built in this environment (make install)"
else
    # In place: the GPU machine's python has no editable install of ppt_fast, and nothing can be fetched there.
    step build 240 env MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
fi
"$PY" -c "import ppt_fast, ppt_fast._backend as b, torch; d = torch.device('cuda' if torch.cuda.is_available() else 'cpu'); print({op: b.available_backends(op, d) for op in ('sensitivity_accumulate', 'select_pivots', 'sparse_adamw_step', 'pivot_grad_norm')})" >> "$LOG" 2>&1

# ---- every CUDA-marked test (every op x backend on CUDA tensors; skipped with the reason on CPU) ---------------------
CUDA_TESTS="tests/test_cuda_kernels.py tests/test_ops_sensitivity_accumulate.py tests/test_ops_select_pivots.py
    tests/test_ops_sparse_adamw_step.py tests/test_ops_pivot_grad_norm.py tests/test_optim.py tests/test_sensitivity_api.py"
# shellcheck disable=SC2086
step cuda_tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider -m "cuda and not slow" $CUDA_TESTS

# ---- the Triton kernels: compiled on the GPU, interpreted (a tiny subset) in the dry run -----------------------------
if [ $DRY = 1 ]; then
    step triton 120 env TRITON_INTERPRET=1 "$PY" -m pytest -q -rs -p no:cacheprovider -m interpreter \
        tests/test_triton_kernels.py -k "sparse_adamw or pivot_grad_norm"
else
    step triton 120 env -u TRITON_INTERPRET "$PY" -m pytest -q -rs -p no:cacheprovider -m interpreter \
        tests/test_triton_kernels.py
fi

# ---- benchmark headline cases ---------------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
    step bench 180 "$PY" benchmarks/run.py --suite smoke --out "$OUT/bench" -- \
        -k "sensitivity_accumulate or select_pivots or sparse_adamw_step"
else
    # musicgen-medium's whole tensor list (588 tensors, 1.84 B entries) at 1 %, fp32 and bf16: the op providers, the
    # optimizer as users call it, and dense masked AdamW beside them; no torch.compile (minutes of compiling).
    step bench 200 "$PY" benchmarks/run.py --suite gpu --out "$OUT/bench" -- \
        -k "(sensitivity_accumulate or select_pivots or sparse_adamw_step) and not ref and not foreach" \
        --bench-sizes medium --bench-densities 0.01 --bench-mem-sizes medium --bench-rounds 5 --bench-case-seconds 5
fi
rm -f "$OUT/bench/speedup_memory_vs_density.png"  # the device tool brings back at most 8 files

# ---- end to end ------------------------------------------------------------------------------------------------------
# One tune step through the transformers host (the GPU machines have no audiocraft), musicgen-medium shapes in bf16,
# B = 1, 5 s, ppt at 1 %: ppt_fast against dense masked tuning (issue 25's GPU case; target: <= 6 GB peak) and against
# PEFT's LoRA (the musicgen-dreamboothing recipe) and SHiRA at ppt's count (issue 26's GPU case). The dry run takes
# the tiny random model on the CPU. Each probe prints one JSON line into check.log.
for method in dense_masked ppt_fast lora shira; do
    if [ $DRY = 1 ]; then
        spec='{"model": "tiny", "method": "'$method'", "phase": "train", "density": 0.01, "device": "cpu",
               "seconds": 1.0, "steps": 1, "host": "transformers"}'
        step "tune_step_tiny_$method" 120 "$PY" benchmarks/tune_probe.py "$spec"
    else
        spec='{"model": "medium", "method": "'$method'", "phase": "train", "density": 0.01, "device": "cuda",
               "seconds": 5.0, "steps": 3, "host": "transformers", "dtype": "bfloat16"}'
        step "tune_step_medium_bf16_$method" 120 "$PY" benchmarks/tune_probe.py "$spec"
    fi
done

# ---- summary -------------------------------------------------------------------------------------------------------
"$PY" - "$STEPS" "$OUT/summary.json" "$DRY" <<'EOF'
import json, sys
rows = []
for line in open(sys.argv[1]):
    name, status, rc, seconds, why = line.rstrip("\n").split("\t")
    rows.append({"step": name, "status": status, "rc": int(rc) if rc else None, "seconds": int(seconds),
                 **({"why": why} if why else {})})
ok = all(r["status"] in ("passed", "skipped") for r in rows)
json.dump({"dry_run": sys.argv[3] == "1", "ok": ok, "steps": rows}, open(sys.argv[2], "w"), indent=1)
for r in rows:
    print(f"{r['step']:24s} {r['status']:10s} {r['seconds']:4d} s  {r.get('why', '')}")
sys.exit(0 if ok else 1)
EOF
rc=$?
rm -f "$STEPS"
note "done in $(( $(date +%s) - T0 )) s; everything is in $OUT"
exit $rc
