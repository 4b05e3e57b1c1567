#!/usr/bin/env bash
# The whole GPU step-cost benchmark in one script (a few minutes on one H100/H200).
#
#   bash benchmarks/gpu_bench.sh            # all sections, results in $OUT (default ./bench_out)
#   bash benchmarks/gpu_bench.sh r50 deit   # only some sections: r50, deit, compile
#
# Sections (each its own process, its own timeout; every config's result is written to JSON as soon as it
# is measured, so a timeout keeps what was done):
#   r50      resnet50, batch 256, 224 px, bf16 autocast, channels_last: plain / --stim none / hand loop,
#            ST, ST++ and ST++ memory-lean, M = 1 and 6 (eager)
#   deit     deit_small_patch16_224 (dynamic_img_size), batch 256, bf16: same configs, M = 1 and 6 (eager)
#   compile  resnet50 as above, eager and torch.compile (inductor): plain = whole model; ST++ M=6 with
#            bucketed subnet sizes 96/160/224 and task.compile(scope='full') (full pass compiled, subnets
#            eager) and scope='blocks' (every block, a static graph per size); dynamo graph counts per step
#   compile_random  (not in the default set) regional compile with the uniform ST++ sizes 96..224, M=1,
#            a few steps: shows whether this torch's inductor keeps the subnet graphs dynamic (graph count
#            flat after step 1) or specialises per size (about one graph per block per new size, as
#            torch 2.14 does on CPU); can take minutes of compiling
# Environment: OUT (output folder), PYTHON (default: python), BUDGET_S (skip sections that would start
# with less than their timeout left; default 570), T_R50 / T_DEIT / T_COMPILE (per-section timeouts, s),
# REP / CREP (step_cost.py repeat flags for eager / compile sections).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
OUT="${OUT:-$PWD/bench_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET_S="${BUDGET_S:-570}"
SECTIONS="${*:-r50 deit compile}"

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_bench.log"; }

{
  echo "# gpu_bench.sh $(date -Is) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1 || echo "nvidia-smi: not available"
  nvidia-smi -q 2>/dev/null | grep -E "MIG Mode|Current  *:" | head -4 || true
  "$PY" - <<'EOF' 2>&1
import platform, torch, timm
print('python', platform.python_version(), '| torch', torch.__version__, '| timm', timm.__version__,
      '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version(),
      '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')
EOF
  nproc; grep -m1 "model name" /proc/cpuinfo || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  DEV=cuda
  R50="--model resnet50 --batch-size 256 --img-size 224 --device cuda --amp-dtype bfloat16 --channels-last"
  DEIT="--model deit_small_patch16_224 --batch-size 256 --img-size 224 --device cuda --amp-dtype bfloat16"
  REP="${REP:---repeats 30 --warmup 10}"
  CREP="${CREP:---repeats 20 --warmup 8}"
  # measured on an H200 (2026-11-27): r50 ~210 s (85 s of it cudnn pre-warm of 129 sizes), deit ~55 s, compile
  # ~210 s with the blocks scope alone (47 s plain compile, 115 s regional); a run of everything needs ~10 min
  T_R50="${T_R50:-300}"; T_DEIT="${T_DEIT:-120}"; T_COMPILE="${T_COMPILE:-400}"
  BUCKETS="96 160 224"; RANDOM_BACKEND=""
else
  DEV=cpu
  log "no CUDA device: CPU dry run with tiny settings"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  R50="--model resnet18 --batch-size 4 --img-size 32 --device cpu"
  DEIT="--model deit_tiny_patch16_224 --batch-size 4 --img-size 32 --device cpu"
  REP="--repeats 2 --warmup 1"
  CREP="--repeats 2 --warmup 2 --compile-backend eager"
  T_R50="${T_R50:-300}"; T_DEIT="${T_DEIT:-300}"; T_COMPILE="${T_COMPILE:-300}"
  BUCKETS="16 24 32"; RANDOM_BACKEND="--compile-backend eager"
fi

run_section() {  # name timeout args...
  local name=$1 t=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < 30 )); then log "skip $name: only ${left}s of the ${BUDGET_S}s budget left"; return; fi
  if (( t > left )); then t=$left; fi
  log "start $name (timeout ${t}s): step_cost.py $*"
  timeout -k 15 "$t" "$PY" benchmarks/step_cost.py "$@" --json "$OUT/$name.json" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  local rc=$?
  log "end $name rc=$rc$( ((rc == 124)) && echo ' (timed out: partial JSON kept)')"
  cat "$OUT/$name.txt"
  ((rc == 0)) || tail -n 20 "$OUT/$name.err"
}

for s in $SECTIONS; do
  case "$s" in
    r50)
      run_section r50_eager "$T_R50" $R50 $REP --subnets 1 6 --configs plain none hand st st++ st++lean ;;
    deit)
      run_section deit_eager "$T_DEIT" $DEIT $REP --subnets 1 6 --configs plain none hand st++ st++lean ;;
    compile)
      # graph check folded into the compiled ST++ rows (graphs_per_step over warm-up + timed steps)
      run_section r50_compile "$T_COMPILE" $R50 $CREP --subnets 6 --configs plain st++ \
        --compile --graph-steps 0 --stim-sizes $BUCKETS ;;
    compile_random)
      run_section r50_compile_random "$T_COMPILE" $R50 --repeats 3 --warmup 3 --subnets 1 --configs st++ \
        --compile --compile-only --graph-steps 0 $RANDOM_BACKEND ;;
    *) log "unknown section $s (use r50, deit, compile, compile_random)" ;;
  esac
done
log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
