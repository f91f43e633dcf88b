#!/usr/bin/env bash
# The GPU suite: on one H100/H200, within 8 minutes, check every Triton kernel against its
# reference on CUDA and run the kernel, step, train, pipeline and sampler benchmarks; write JSON and
# a summary to OUTDIR and print the summary table last.
#
#   benchmarks/gpu_suite.sh [OUTDIR]        # default: benchmarks/results/gpu-suite-<UTC time>/
#   GPU_SUITE_DRY=1 benchmarks/gpu_suite.sh /tmp/suite    # CPU dry run: every stage's quick CPU variant
#   GPU_SUITE_COMPILE=1 ...   # then, in whatever is left of the 8 minutes, bench_step compiled (added to step.json)
#
# Needs python3 with torch, triton, numpy, pyyaml, pillow, safetensors, pytest (DALI optional: the
# torch fallback pipeline is used where it is missing). Run from anywhere; the repo need not be
# pip-installed (PYTHONPATH is set to the repo). PYTHON=... picks the interpreter.
#
# OUTDIR gets at most 8 files: suite.log (everything printed), cuda_tests.log, kernels.json,
# step.json, train.json, pipeline.json, sample.json, summary.md. Each stage runs under `timeout`;
# a stage that fails or times out is recorded in summary.md and the suite goes on. Eager mode only:
# torch.compile of DDPM++ 64 takes about 100 s per patch size (benchmarks/results/networks_h200.json),
# more than the 8 minutes allow; compiled end-to-end figures come from a separate run, e.g.
#   python3 benchmarks/bench_train.py --device cuda --batch 64 --modes compile --synthetic 2048 \
#       --set data.backend=torch --set data.workers=12 --out OUTDIR/train_compile.json   # ~8 min
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY="${GPU_SUITE_DRY:-0}"
PY="${PYTHON:-python3}"
OUT="${1:-benchmarks/results/gpu-suite-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET="${GPU_SUITE_BUDGET:-470}"     # seconds for all stages (8 minutes less the summary)
RESERVE=8                             # kept back for the summary
T0=$(date +%s)
WORK="$(mktemp -d /tmp/gpu-suite.XXXXXX)"
STAGES="$WORK/stages.tsv"
: > "$STAGES"
trap 'rm -rf "$WORK"' EXIT

CORES=$(nproc 2>/dev/null || echo 4)
WORKERS=$(( CORES > 12 ? 12 : CORES ))

# run_stage NAME CAP_SECONDS NOTE COMMAND: the command (a bash string) under timeout, at most CAP
# seconds and never past the suite's budget; its exit status and time go to the stage table.
run_stage() {
    local name="$1" cap="$2" note="$3" cmd="$4"
    local left=$(( BUDGET - ($(date +%s) - T0) - RESERVE ))
    if (( left < 15 )); then
        echo "=== [$name] skipped: ${left}s left of the suite's budget"
        printf '%s\tskip\t0\tno time left in the 8-minute budget\n' "$name" >> "$STAGES"
        return
    fi
    local t=$(( cap < left ? cap : left ))
    echo
    echo "=== [$name] (timeout ${t}s) $cmd"
    local s=$(date +%s)
    timeout -k 5 "$t" bash -c "$cmd"
    local rc=$?
    local d=$(( $(date +%s) - s ))
    echo "=== [$name] exit $rc after ${d}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$d" "$note" >> "$STAGES"
}

suite() {
    echo "gpu_suite: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), out $OUT, dry=$DRY, budget ${BUDGET}s"
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"

    if [[ "$DRY" == "1" ]]; then
        export OMP_NUM_THREADS=1
        DEV=cpu
        STEP_ARGS="--device cpu --modes eager --configs tiny --batch 2 --repeats 1 --set network.model_channels=8 --set network.channel_mult=[1,2] --set data.resolution=16"
        TRAIN_ARGS="--quick --device cpu --modes eager --synthetic 64 --set data.backend=torch"
        PIPE_ARGS="--backends torch,baseline --device cpu --seconds 0.3 --images 64 --formats png --workers 1 --resolution 32 --batch 4"
        SAMPLE_ARGS="--quick --device cpu --batch 1"
    else
        DEV=cuda
        STEP_ARGS="--device cuda --modes eager --precision bf16 --configs celeba64 --batch 64 --repeats 5"
        TRAIN_ARGS="--device cuda --config celeba64 --batch 64 --modes eager --synthetic 2048 --intervals 10 --interval-steps 3 --wall-budget 45 --set data.backend=torch --set data.workers=$WORKERS"
        PIPE_ARGS="--backends torch,baseline --device cuda --seconds 2 --images 1024 --formats png,raw --workers $WORKERS"
        SAMPLE_ARGS="--quick --device cuda"
    fi

    # Kernel checks and the kernel benchmark first: they are what only this machine can measure.
    # pytest-xdist (in the GPU image) spreads the cold Triton compiles over the cores.
    XDIST=""
    if [[ "$DRY" != "1" ]] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
    run_stage "1 cuda tests" 150 "pytest -m 'cuda or kernels': every Triton kernel vs its float64 reference on CUDA, training shapes, Inductor step, pipeline on CUDA" \
        "'$PY' -m pytest -q -p no:cacheprovider $XDIST -m 'cuda or kernels' tests/ > '$OUT/cuda_tests.log' 2>&1; rc=\$?; tail -n 25 '$OUT/cuda_tests.log'; exit \$rc"
    run_stage "2 kernels" 150 "bench_kernels --quick: Triton vs eager vs torch.compile, GB/s (JSON rewritten after every shape)" \
        "'$PY' benchmarks/bench_kernels.py --quick --json '$OUT/kernels.json'"
    run_stage "3 step" 45 "bench_step eager bf16, DDPM++ 64 batch 64: ms/step per patch size, schedule cost/img" \
        "'$PY' benchmarks/bench_step.py $STEP_ARGS --out '$OUT/step.json'"
    run_stage "4 sample" 45 "bench_sample --quick: tiny and DDPM++ 64 at 35/79 NFE" \
        "'$PY' benchmarks/bench_sample.py $SAMPLE_ARGS --out '$WORK/sample'; rc=\$?; f=\$(ls -t '$WORK'/sample/*.json 2>/dev/null | head -n 1); [[ -n \"\$f\" ]] && mv \"\$f\" '$OUT/sample.json'; exit \$rc"
    run_stage "5 pipeline" 45 "bench_pipeline torch fallback vs baseline loader (DALI absent)" \
        "'$PY' benchmarks/bench_pipeline.py $PIPE_ARGS --out '$OUT/pipeline.json'"
    run_stage "6 train" 110 "bench_train eager: real loop + torch pipeline, p=1 vs p=0.5, data-wait share" \
        "'$PY' benchmarks/bench_train.py $TRAIN_ARGS --out '$OUT/train.json'"

    if [[ "${GPU_SUITE_COMPILE:-0}" == "1" ]]; then
        run_stage "7 step compile" 400 "bench_step compiled (opt-in): ~100 s of torch.compile per patch size when the cache is cold" \
            "'$PY' benchmarks/bench_step.py ${STEP_ARGS/--modes eager/--modes compile} --append --out '$OUT/step.json'"
    fi

    echo
    echo "gpu_suite: stages done after $(( $(date +%s) - T0 ))s; files in $OUT:"
    ls -l "$OUT"
    echo
    "$PY" benchmarks/make_table.py --summary "$OUT" --stages "$STAGES" || cat "$STAGES"
}

suite 2>&1 | tee "$OUT/suite.log"
