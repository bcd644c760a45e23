#!/usr/bin/env bash
# Every GPU check of the project, in one run of at most 8 minutes on a bare GPU machine.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUTDIR]
#
# OUTDIR (default: $OUT, else benchmarks/results/gpu) receives at most 6 files:
#   summary.md  device, versions, command, and each step's status and time
#   tests.md    the test suite on CUDA (LOWRANK_TEST_DEVICE=cuda; CPU-only tests skip)
#   step.md     bench_step.py on the LLaMA-1B matrix shapes (4 layers: 28 matrices,
#               rank 512), amortized over one refresh gap, side by side with torch AdamW
#               (fused) and bitsandbytes AdamW8bit
#   peak.md     bench_peak.py on CUDA: peak memory of a real training step of LLaMA-7B
#               Q-GaLore (per-layer, checkpointing), LLaMA-7B LoQT 8-bit, LLaMA-13B
#               LoQT 8-bit per-layer, LLaMA-7B INT8 + APOLLO-Mini (per-layer,
#               checkpointing; no SVD, so seconds beside the others' minutes) (four
#               processes at once, each measuring its own torch.cuda.max_memory_allocated)
#   quality.md  shootout.py at LLaMA-60M size on the built-in corpus: AdamW, GaLore,
#               Q-GaLore, LoQT at the papers' 60M rates, same data, as many steps as fit
#               in the time left (measured by a short calibration run)
#   log.txt     everything the steps printed
#
# Each step runs under `timeout`, so one failure or hang cannot use up the whole run; a
# failed step is reported in summary.md and the next one runs. bitsandbytes, when it is
# not importable, is installed from the wheel in .whl/ (git-ignored; fetch it with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2)
# into a temporary folder put on PYTHONPATH; the package is used from this checkout.
#
# --dry-run runs every step at toy size on the CPU (a test runs it), so that no GPU time
# is spent debugging this script.
set -u

# ---- the steps (each runs in its own bash under `timeout`, see step()) ------------------
if [ "${DRY:-0}" = 1 ]; then
    SHAPES=(--hidden 64 --intermediate 160 --n-heads 2 --n-layers 1 --rank 16 --update-proj-gap 4 --warmup 1)
    CASES=qgalore:micro:32:ckpt,loqt8bit:micro:32,loqt8bit_per_layer:micro:32,qapollo_mini:micro:32:ckpt
    Q=(--config micro --batch-size 2 --eval-batches 1 --threads 1)
    CAL_STEPS=4
    MAX_STEPS=8
else
    SHAPES=(--hidden 2048 --intermediate 5461 --n-heads 32 --n-layers 4 --rank 512 --update-proj-gap 200 --warmup 2)
    CASES=qgalore:llama_7b:256:ckpt,loqt8bit:llama_7b:256,loqt8bit_per_layer:llama_13b:256,qapollo_mini:llama_7b:256:ckpt
    Q=(--config llama_60m --batch-size 64 --eval-batches 4)
    CAL_STEPS=20
    MAX_STEPS=3000
fi
Q+=(--methods adamw,galore,qgalore,loqt --lr adamw=1e-3,galore=1e-2,qgalore=1.5e-2,loqt=1e-2
    --device "${DEV:-cpu}" --no-plot --quiet)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

# 1. the test suite on the device
run_tests() {
    local extra=() which=(tests) rc
    $PY -c "import xdist" 2>/dev/null && [ $DRY = 0 ] && extra+=(-n 16)
    $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 60)
    [ $DRY = 1 ] && which=(tests/test_quant.py -k "pack or invalid")
    LOWRANK_TEST_DEVICE=$DEV $PY -m pytest -q -p no:cacheprovider -rfE --tb=short "${extra[@]}" \
        "${which[@]}" > "$WORK/tests.txt" 2>&1
    rc=$?
    {
        echo "# Test suite on $DEV"
        echo
        echo "- command: \`LOWRANK_TEST_DEVICE=$DEV python -m pytest -q -rfE --tb=short ${extra[*]} ${which[*]}\` (exit $rc)"
        echo "- result: $(tail -n 1 "$WORK/tests.txt")"
        echo
        echo '```'
        head -c 200000 "$WORK/tests.txt"
        echo '```'
    } > "$DEST/tests.md"
    cat "$WORK/tests.txt" | tail -n 40
    return $rc
}

# 2. optimizer step time on the LLaMA-1B shapes
run_step_time() {
    $PY benchmarks/bench_step.py --device $DEV "${SHAPES[@]}" --repeats 1 --pool 2 \
        --optimizers adamw+foreach=True,adamw_fused,adamw8bit,galore,galore_randomized,galore8bit,qgalore \
        --out "$DEST/step.md"
}

# 3. peak memory of real training steps
run_peak_memory() {
    $PY benchmarks/bench_peak.py --device $DEV --cases $CASES --jobs 4 --timeout 165 \
        --out "$DEST/peak.md"
}

# 4. a short quality run at LLaMA-60M size: calibrate on the two slowest methods, then
#    as many steps as fit in the time left
run_quality() {
    local budget steps
    $PY benchmarks/shootout.py "${Q[@]}" --methods qgalore,loqt --steps $CAL_STEPS \
        --eval-every $CAL_STEPS --out "$WORK/calibration" || return 1
    budget=$(( $(left) - 15 ))
    steps=$($PY - "$WORK/calibration/results.json" $budget $CAL_STEPS $MAX_STEPS <<'PYEOF'
import json, sys
runs = json.load(open(sys.argv[1]))["results"]
budget, cal, most = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
# the first GPU run (batch 16): the estimate with 1.5 x overhead and 1.25 x iter_s left
# 70 steps and used 91 of 170 s, so the margins are smaller now
iter_s = max(r["iter_ms"] for r in runs) / 1e3
overhead = max(r["wall_s"] - cal * iter_s for r in runs)    # start, warm-up, evaluations
steps = int((budget / 4 - 1.1 * overhead) / (1.1 * iter_s))   # 4 methods
print(max(5, min(steps, most)) // 5 * 5)
PYEOF
) || return 1
    echo "quality: $(left) s left, $steps steps per method"
    $PY benchmarks/shootout.py "${Q[@]}" --steps "$steps" --eval-every $(( steps / 5 )) \
        --out "$WORK/quality" || return 1
    cp "$WORK/quality/results.md" "$DEST/quality.md"
}

if [ "${1:-}" = --_run ]; then      # internal: one step, started by step() below
    "run_$2"
    exit $?
fi

# ---- main ------------------------------------------------------------------------------
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
DEST=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg (allowed: --dry-run, OUTDIR)" >&2; exit 2 ;;
        *) DEST=$arg ;;
    esac
done
DEST=${DEST:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$DEST/log.txt
: > "$LOG"
START=$(date +%s)
TOTAL=470                       # seconds for the whole run (the issue's limit: 480)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! $PY -c "import bitsandbytes" 2>/dev/null; then
    whl=$(ls "$ROOT"/.whl/bitsandbytes-*.whl 2>/dev/null | tail -n 1)
    if [ -z "$whl" ]; then
        echo "gpu_check.sh: bitsandbytes is not importable and no wheel is in .whl/" >&2
        exit 1
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
        "$whl" >> "$LOG" 2>&1 || { echo "gpu_check.sh: installing $whl failed (see $LOG)" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
if [ $DRY = 1 ]; then
    DEV=cpu
    export OMP_NUM_THREADS=1
else
    DEV=cuda
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu_check.sh: no CUDA device (use --dry-run on a machine without a GPU)" >&2; exit 1; }
fi
export DRY DEV DEST WORK START TOTAL PY

# step NAME SECONDS: run run_NAME in its own bash under a time limit; its output goes to
# the log, its status line to $WORK/status.NAME
step() {
    local name=$1 limit=$2 t0 rc dt what=ok
    t0=$(date +%s)
    echo "=== $name started (limit ${limit} s)"
    timeout -k 10 "$limit" bash "$ROOT/benchmarks/gpu_check.sh" --_run "$name" > "$WORK/log.$name" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    [ $rc = 0 ] || what="FAILED (exit $rc)"
    if [ $rc = 124 ] || [ $rc = 137 ]; then what="TIMED OUT after ${limit} s"; fi
    echo "=== $name: $what in ${dt} s"
    echo "| $name | $what | $dt |" > "$WORK/status.$name"
}

# One step at a time: the first run, with the tests (-n 8) beside the peak-memory processes,
# took the tests past 110 s; alone with -n 16 they took 51 s.
step tests $([ $DRY = 1 ] && echo 120 || echo 90)
step peak_memory 175
step step_time 90
step quality $(( $(left) > 30 ? $(left) : 30 ))
for name in tests peak_memory step_time quality; do
    { echo "=== $name"; cat "$WORK/log.$name"; } >> "$LOG"
done

{
    echo "# GPU check$([ $DRY = 1 ] && echo ' (dry run on the CPU, toy sizes)')"
    echo
    echo "- command: \`bash benchmarks/gpu_check.sh $*\`; steps and their commands: the script"
    echo "- date: $(date -Iseconds); total $(( $(date +%s) - START )) s"
    echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    $PY - <<'PYEOF'
import platform, torch
try:
    import bitsandbytes as bnb; b = bnb.__version__
except Exception as exc:  # noqa: BLE001
    b = f"not importable ({exc!r})"
vers = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"bitsandbytes {b}"]
for mod in ("triton", "transformers"):
    try:
        vers.append(f"{mod} {__import__(mod).__version__}")
    except Exception:  # noqa: BLE001
        vers.append(f"{mod} absent")
print("- versions: " + ", ".join(vers))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"CUDA {torch.version.cuda}")
else:
    print(f"- device: cpu ({platform.processor() or platform.machine()})")
PYEOF
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    cat "$WORK"/status.tests "$WORK"/status.peak_memory "$WORK"/status.step_time "$WORK"/status.quality
} > "$DEST/summary.md"
cat "$DEST/summary.md"
! grep -q "FAILED\|TIMED OUT" "$DEST/summary.md"
