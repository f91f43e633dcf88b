#!/usr/bin/env bash
# The GPU suite: on one H100/H200, check every Triton kernel against its reference on CUDA and run
# the kernel, step, sampler, pipeline and training benchmarks; write JSON and a summary to OUTDIR and
# print the summary table last. Every figure of a training step comes with its TFLOP/s and MFU.
#
#   benchmarks/gpu_suite.sh [OUTDIR]        # default: benchmarks/results/gpu-suite-<UTC time>/
#   GPU_SUITE_DRY=1 benchmarks/gpu_suite.sh /tmp/suite    # CPU dry run: every stage's quick CPU variant
#   GPU_SUITE_STAGES=pipeline,roi GPU_SUITE_BUDGET=200 benchmarks/gpu_suite.sh OUTDIR_A     # ~3 min
#   GPU_SUITE_STAGES=train-compile GPU_SUITE_BUDGET=570 benchmarks/gpu_suite.sh OUTDIR_B    # ~8 min
#                                           # issue #14's evidence: DALI's GPU decode (after
#                                           # benchmarks/dali_carry.py), compiled MFU, data.cache
#
# Stages (GPU_SUITE_STAGES picks them, comma-separated; default: cuda,kernels,step,recipes,sample,
# pipeline,train,roi, in 8 minutes):
#   cuda           pytest -m 'cuda or kernels': every Triton kernel vs its reference on CUDA
#   kernels        bench_kernels --quick: GB/s against copy bandwidth
#   step           bench_step eager bf16, DDPM++ 64 batch 64, per patch size, with TFLOP/s and MFU
#   recipes        bench_step eager bf16 of the EDM2 and DiT presets (edm2_img64_s, edm2_img512_xs,
#                  imagenet256_dit_b2, imagenet256_dit_xl2) per patch or window size, with TFLOP/s and MFU
#   sample         bench_sample --quick
#   pipeline       bench_pipeline at 64x64: DALI (JPEG decoded on the GPU, "mixed") when installed,
#                  the torch fallback and the baseline loader; png, jpeg, raw
#   train          bench_train eager: real loop, p=1 vs the schedule, data wait, MFU
#   roi            bench_pipeline at 256x256 (jpeg, raw): decode only what is cropped (DALI's ROI
#                  decoders on the GPU; raw rows read straight from the tar)
#   train-compile  bench_train compiled bf16, DDPM++ 64 at the default schedule (patch run only) with
#                  data wait and MFU, streaming raw shards and then the same run with the dataset on
#                  the GPU (data.cache=device); about 5 minutes of torch.compile on a cold cache
#   step-compile   bench_step compiled (also GPU_SUITE_COMPILE=1), added to step.json
#
# DALI: used where it imports; benchmarks/dali_carry.py installs it into /tmp/pdiff-dali on a machine
# without a package index, and this script puts that folder (DALI_SITE) on PYTHONPATH when it holds
# nvidia/dali. Needs python3 with torch, triton, numpy, pyyaml, pillow, safetensors, pytest and setuptools.
# Run from anywhere: pdiff runs installed (pdiff.kernels, pdiff.pipelines and pdiff.tools are folders of the
# checkout mapped by pyproject.toml), so the suite first installs the checkout it runs from into PYTHON's
# environment, editable and without fetching anything (--no-deps --no-build-isolation: the GPU machine has
# no package index). PYTHON=... picks the interpreter.
#
# OUTDIR gets suite.log (everything printed), summary.md and one file per stage (cuda_tests.log,
# kernels.json, step.json, step_recipes.json, sample.json, pipeline.json, train.json, pipeline256.json,
# train_compile.json). A device call brings back 8 files at most: pack OUTDIR into one
# (tar -czf $OUT/suite.tgz -C OUTDIR .). Each stage runs under `timeout`; a stage that fails or
# times out is recorded in summary.md and the suite goes on.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY="${GPU_SUITE_DRY:-0}"
PY="${PYTHON:-python3}"
OUT="${1:-benchmarks/results/gpu-suite-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# This checkout, installed editable where PY looks (unless it is already): pdiff.kernels must resolve to
# $REPO/kernels. pip refuses a distribution-managed Python without --break-system-packages (older pips do
# not know that option, and do not need it).
installed_here() {
    "$PY" -c "import os, sys, pdiff.kernels as k; sys.exit(os.path.realpath(k.__file__) != os.path.realpath('$REPO/kernels/__init__.py'))" 2>/dev/null
}
if ! installed_here; then
    echo "gpu_suite: installing $REPO (pip install --no-deps --no-build-isolation -e)"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e "$REPO" \
        || "$PY" -m pip install -q --no-deps --no-build-isolation --break-system-packages -e "$REPO"
    installed_here || { echo "gpu_suite: could not install $REPO into $PY's environment (see pip's message above)" >&2; exit 1; }
fi
DALI_SITE="${DALI_SITE:-/tmp/pdiff-dali}"
if [[ -d "$DALI_SITE/nvidia/dali" ]]; then    # carried by benchmarks/dali_carry.py
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$DALI_SITE"
    for lib in nvidia/cu13/lib nvidia/nvimgcodec nvidia/libnvcomp/lib64; do
        [[ -d "$DALI_SITE/$lib" ]] && export LD_LIBRARY_PATH="$DALI_SITE/$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
fi
export PYTHONUNBUFFERED=1
STAGES_WANTED=",${GPU_SUITE_STAGES:-cuda,kernels,step,recipes,sample,pipeline,train,roi},"
[[ "${GPU_SUITE_COMPILE:-0}" == "1" ]] && STAGES_WANTED="${STAGES_WANTED}step-compile,"
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
# seconds and never past the suite's budget; its exit status and time go to the stage table. NAME is
# "N key": only the keys in GPU_SUITE_STAGES run.
run_stage() {
    local name="$1" cap="$2" note="$3" cmd="$4"
    [[ "$STAGES_WANTED" == *",${name#* },"* ]] || return 0
    local left=$(( BUDGET - ($(date +%s) - T0) - RESERVE ))
    if (( left < 15 )); then
        echo "=== [$name] skipped: ${left}s left of the suite's budget"
        printf '%s\tskip\t0\tno time left in the budget (%ss)\n' "$name" "$BUDGET" >> "$STAGES"
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
    DALI=0
    if [[ "$STAGES_WANTED" =~ ,(pipeline|roi|train-compile), ]]; then
        if "$PY" -c "from pdiff.pipelines import dali_available; import sys; sys.exit(not dali_available())" 2>/dev/null; then
            DALI=1; "$PY" -c "import nvidia.dali as d; print('dali', d.__version__, d.__file__)"
        else
            echo "dali: not installed (benchmarks/dali_carry.py carries it): the torch pipeline only"
        fi
    fi
    PIPE_BACKENDS=$([[ $DALI == 1 ]] && echo dali,torch || echo torch)

    if [[ "$DRY" == "1" ]]; then
        export OMP_NUM_THREADS=1
        DEV=cpu
        STEP_ARGS="--device cpu --modes eager --configs tiny --batch 2 --repeats 1 --set network.model_channels=8 --set network.channel_mult=[1,2] --set data.resolution=16"
        RECIPE_ARGS="--device cpu --modes eager --configs tiny_edm2,tiny_dit --batch 2 --repeats 1"
        TRAIN_ARGS="--quick --device cpu --modes eager --synthetic 64 --set data.backend=torch"
        PIPE_ARGS="--backends $PIPE_BACKENDS,baseline --device cpu --seconds 0.3 --images 64 --formats png,jpeg --workers 1 --resolution 32 --batch 4"
        ROI_ARGS="--backends $PIPE_BACKENDS --device cpu --seconds 0.3 --images 16 --formats jpeg,raw --workers 1 --resolution 64 --batch 2"
        COMPILE_ARGS="--quick --device cpu --modes eager --runs patch --cache none,device --synthetic 64 --encoding raw"
        SAMPLE_ARGS="--quick --device cpu --batch 1"
    else
        DEV=cuda
        STEP_ARGS="--device cuda --modes eager --precision bf16 --configs celeba64 --batch 64 --repeats 5"
        RECIPE_ARGS="--device cuda --modes eager --precision bf16 --configs edm2_img64_s,edm2_img512_xs,imagenet256_dit_b2,imagenet256_dit_xl2 --batch 32 --repeats 3"
        TRAIN_ARGS="--device cuda --config celeba64 --batch 64 --modes eager --synthetic 2048 --intervals 10 --interval-steps 3 --wall-budget 45 --set data.backend=torch --set data.workers=$WORKERS"
        PIPE_ARGS="--backends $PIPE_BACKENDS,baseline --device cuda --seconds 1 --images 1024 --formats png,jpeg,raw --workers $WORKERS"
        ROI_ARGS="--backends $PIPE_BACKENDS --device cuda --seconds 2 --images 512 --formats jpeg,raw --workers $WORKERS --resolution 256"
        # DDPM++ 64 at the preset's batch (256 full images a step, 1024 patches at 16 px), raw shards
        # (no decode), the data backend DALI where installed; then the same with data.cache=device.
        COMPILE_ARGS="--device cuda --config celeba64 --modes compile --runs patch --cache none,device --synthetic 4096 --encoding raw --intervals 6 --interval-steps 3 --set data.workers=$WORKERS --set train.precision=bf16"
        SAMPLE_ARGS="--quick --device cuda"
    fi

    # Kernel checks and the kernel benchmark first: they are what only this machine can measure.
    # pytest-xdist (in the GPU image) spreads the cold Triton compiles over the cores.
    XDIST=""
    if [[ "$DRY" != "1" ]] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
    run_stage "1 cuda" 150 "pytest -m 'cuda or kernels': every Triton kernel vs its float64 reference on CUDA, training shapes, Inductor step, pipeline on CUDA" \
        "'$PY' -m pytest -q -p no:cacheprovider $XDIST -m 'cuda or kernels' tests/ > '$OUT/cuda_tests.log' 2>&1; rc=\$?; tail -n 25 '$OUT/cuda_tests.log'; exit \$rc"
    run_stage "2 kernels" 150 "bench_kernels --quick: Triton vs eager vs torch.compile, GB/s (JSON rewritten after every shape)" \
        "'$PY' benchmarks/bench_kernels.py --quick --json '$OUT/kernels.json'"
    run_stage "3 step" 45 "bench_step eager bf16, DDPM++ 64 batch 64: ms/step per patch size, schedule cost/img" \
        "'$PY' benchmarks/bench_step.py $STEP_ARGS --out '$OUT/step.json'"
    run_stage "10 recipes" 90 "bench_step eager bf16 of the EDM2 and DiT presets, batch 32: ms/step per patch/window size, TFLOP/s, MFU" \
        "'$PY' benchmarks/bench_step.py $RECIPE_ARGS --out '$OUT/step_recipes.json'"
    run_stage "4 sample" 45 "bench_sample --quick: tiny and DDPM++ 64 at 35/79 NFE" \
        "'$PY' benchmarks/bench_sample.py $SAMPLE_ARGS --out '$WORK/sample'; rc=\$?; f=\$(ls -t '$WORK'/sample/*.json 2>/dev/null | head -n 1); [[ -n \"\$f\" ]] && mv \"\$f\" '$OUT/sample.json'; exit \$rc"
    run_stage "5 pipeline" 100 "bench_pipeline 64x64 ($PIPE_BACKENDS vs the baseline loader; DALI decodes JPEG on the GPU)" \
        "'$PY' benchmarks/bench_pipeline.py $PIPE_ARGS --out '$OUT/pipeline.json'"
    run_stage "6 train" 110 "bench_train eager: real loop + torch pipeline, p=1 vs p=0.5, data-wait share, MFU" \
        "'$PY' benchmarks/bench_train.py $TRAIN_ARGS --out '$OUT/train.json'"
    run_stage "7 roi" 90 "bench_pipeline 256x256 jpeg/raw ($PIPE_BACKENDS): decode only what is cropped" \
        "'$PY' benchmarks/bench_pipeline.py $ROI_ARGS --out '$OUT/pipeline256.json'"
    run_stage "8 train-compile" 480 "bench_train compiled bf16 DDPM++ 64, default schedule: MFU and data wait, streaming and data.cache=device" \
        "'$PY' benchmarks/bench_train.py $COMPILE_ARGS --out '$OUT/train_compile.json'"
    run_stage "9 step-compile" 400 "bench_step compiled: ~100 s of torch.compile per patch size when the cache is cold" \
        "'$PY' benchmarks/bench_step.py ${STEP_ARGS/--modes eager/--modes compile} --append --out '$OUT/step.json'"

    echo
    echo "gpu_suite: stages done after $(( $(date +%s) - T0 ))s; files in $OUT:"
    ls -l "$OUT"
    echo
    "$PY" benchmarks/make_table.py --summary "$OUT" --stages "$STAGES" || cat "$STAGES"
}

suite 2>&1 | tee "$OUT/suite.log"
