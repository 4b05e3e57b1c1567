#!/usr/bin/env bash
# The whole GPU benchmark in one script: step cost (eager, compiled), train_stim.py's loop speed, an end-to-end
# train_stim.py run under torchrun, and the per-step host-device sync check.
#
#   bash benchmarks/gpu_bench.sh                   # all sections, results in $OUT (default ./bench_out)
#   bash benchmarks/gpu_bench.sh compile loop      # only some sections
#
# Sections (each its own process(es), its own timeout; every result is written to JSON as soon as it is
# measured, so a timeout keeps what was done):
#   r50      resnet50, batch 256, 224 px, bf16 autocast, channels_last: plain / --stim none / hand loop,
#            ST, ST++ and ST++ memory-lean, M = 1 and 6 (eager)
#   deit     deit_small_patch16_224 (dynamic_img_size), batch 256, bf16: same configs, M = 1 and 6 (eager)
#   compile  (= compile_r50 compile_deit) resnet50 and deit_small, one run each, settings as above: eager, and torch.compile (inductor) of plain
#            training (whole model) against ST and ST++ M = 1 and 6 with task.compile(scope='full') (full pass
#            compiled, subnets eager) and scope='subnets' (subnet passes through the same compiled model, one
#            static graph per (subnet, size): ST++ with size buckets 96/160/224; ST's 216 subnets exceed the
#            graph bound and are refused, reported as such); graphs vs the bound, compile time vs plain's, and a
#            graph check (compiled ST++ M=1, scope 'subnets', sampled steps)
#   loop     train_stim.train_one_epoch vs the step benchmark's own loop, same on-device batches, resnet50,
#            batch $TRAIN_BS, bf16, channels_last, ST++ memory-lean M=6, compiled (scope 'full'): the img/s ratio
#   train    a synthetic ImageNet-shaped folder, then `torchrun --nproc_per_node=1 train_stim.py` on it twice
#            (bf16, and fp16 with GradScaler) with channels_last, --torchcompile, --model-ema, mixup + cutmix,
#            ST++ M=6 memory-lean, --stim-bn-recal; each run checked by benchmarks/train_check.py: exit 0, finite
#            losses in summary.csv, recompiles (TORCH_LOGS=recompiles) within a bound, model_best.pth.tar loads
#            strictly into plain timm, logged img/s vs the loop section's step-benchmark img/s
#   sync     benchmarks/sync_check.py under torchrun on the same folder: bf16 with
#            torch.cuda.set_sync_debug_mode('error') on the steady-state non-log steps, fp16 with 'warn'
# Environment: OUT (output folder), PYTHON (default: python), BUDGET_S (skip sections that would start with less
# than 30 s of it left, and cut timeouts to what is left; default 570), T_R50 / T_DEIT / T_COMPILE / T_LOOP /
# T_TRAIN / T_SYNC (per-section timeouts, s; T_COMPILE per model), REP / CREP (step_cost.py repeat flags for
# eager / compile sections), TRAIN_MODEL / TRAIN_BS / TRAIN_EPOCHS (train, loop and sync sections).
# One device command may run at most 10 minutes: run the sections in calls of at most BUDGET_S each, e.g.
# `compile` and then `loop train sync deit` (the order of priority is in BENCHMARKS.md, "The next GPU run").
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
OUT="${OUT:-$PWD/bench_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET_S="${BUDGET_S:-570}"
SECTIONS="${*:-r50 deit compile loop train sync}"

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
  CREP="${CREP:---repeats 20 --warmup 5}"
  # measured on an H200 (2026-11-27): r50 ~210 s (85 s of it cudnn pre-warm of 129 sizes), deit ~55 s, plain
  # resnet50 compile 47 s; scope 'subnets' compiles up to 26 graphs for resnet50 (8 subnets x 3 sizes + 2):
  # not yet measured, hence the long compile timeout
  T_R50="${T_R50:-240}"; T_DEIT="${T_DEIT:-120}"; T_COMPILE="${T_COMPILE:-300}"
  T_LOOP="${T_LOOP:-180}"; T_TRAIN="${T_TRAIN:-180}"; T_SYNC="${T_SYNC:-150}"
  BUCKETS="96 160 224"; DEIT_BUCKETS="$BUCKETS"; COMPILE_SET="--subnets 1 6 --configs plain st st++"
  TRAIN_MODEL="${TRAIN_MODEL:-resnet50}"; TRAIN_BS="${TRAIN_BS:-128}"; TRAIN_EPOCHS="${TRAIN_EPOCHS:-4}"
  TRAIN_IMG=224; DATA_ARGS="--classes 4 --train-per-class 1280 --val-per-class 64 --size 256"  # 40 steps/epoch
  TRAIN_DEV="--workers 12 --pin-mem --log-interval 10 --stim-bn-recal 512"
  LOOP_ARGS="--repeats 10 --warmup 3 --script-loop-batches 40 --script-loop-rounds 3"
  COMPILE_FLAG="--torchcompile"; SYNC_COMPILE="--torchcompile"; SYNC_WARMUP=45;
  AMP_DTYPES="bfloat16 float16"
else
  DEV=cpu
  log "no CUDA device: CPU dry run with tiny settings"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  R50="--model resnet18 --batch-size 4 --img-size 32 --device cpu"
  DEIT="--model deit_tiny_patch16_224 --batch-size 4 --img-size 32 --device cpu"
  REP="--repeats 2 --warmup 1"
  CREP="--repeats 2 --warmup 1 --compile-backend eager"
  T_R50="${T_R50:-300}"; T_DEIT="${T_DEIT:-300}"; T_COMPILE="${T_COMPILE:-300}"
  T_LOOP="${T_LOOP:-300}"; T_TRAIN="${T_TRAIN:-300}"; T_SYNC="${T_SYNC:-300}"
  BUCKETS="16 24 32"; DEIT_BUCKETS="16 32"; COMPILE_SET="--subnets 2 --configs plain st++"
  TRAIN_MODEL="${TRAIN_MODEL:-resnet18}"; TRAIN_BS="${TRAIN_BS:-8}"; TRAIN_EPOCHS="${TRAIN_EPOCHS:-2}"
  TRAIN_IMG=32; DATA_ARGS="--classes 2 --train-per-class 24 --val-per-class 8 --size 40"  # 6 steps/epoch
  TRAIN_DEV="--workers 0 --log-interval 2 --stim-bn-recal 16 --device cpu"
  LOOP_ARGS="--repeats 2 --warmup 1 --script-loop-batches 3 --script-loop-rounds 2 --compile-backend eager"
  # dynamo capture only (the eager backend): guards and recompiles as with inductor, no C++ compile on 2 cores;
  # the sync check runs eagerly on CPU (its dispatch mode and dynamo do not mix)
  COMPILE_FLAG="--torchcompile eager"; SYNC_COMPILE=""; SYNC_WARMUP=2;
  # CPU autocast to bfloat16 only: train_stim.py makes a GradScaler on CUDA only, and fp16 without loss scaling
  # diverges within a few steps here (the run then stops with its non-finite loss error, exit 1)
  AMP_DTYPES="bfloat16"
fi
NUM_CLASSES=$([[ $DEV == cpu ]] && echo 2 || echo 4)
TRAIN_COMMON="--model $TRAIN_MODEL --num-classes $NUM_CLASSES -b $TRAIN_BS --img-size $TRAIN_IMG --channels-last \
  --model-ema --mixup 0.2 --cutmix 1.0 --stim st++ --stim-subnets 6 --stim-memory-lean $TRAIN_DEV"
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"  # NCCL on CUDA, gloo on CPU

budget_left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

section_timeout() {  # name timeout -> prints the timeout to use, or nothing (and logs) when the budget is spent
  local left; left=$(budget_left)
  if (( left < 30 )); then log "skip $1: only ${left}s of the ${BUDGET_S}s budget left"; return 1; fi
  echo $(( $2 > left ? left : $2 ))
}

run_section() {  # name timeout args...   (a step_cost.py run)
  local name=$1 t; t=$(section_timeout "$1" "$2") || return 0; shift 2
  log "start $name (timeout ${t}s): step_cost.py $*"
  timeout -k 15 "$t" "$PY" benchmarks/step_cost.py "$@" --json "$OUT/$name.json" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  local rc=$?
  log "end $name rc=$rc$( ((rc == 124)) && echo ' (timed out: partial JSON kept)')"
  cat "$OUT/$name.txt"
  ((rc == 0)) || tail -n 20 "$OUT/$name.err"
}

make_data() {
  [[ -f "$OUT/synth/done" ]] && return 0
  "$PY" benchmarks/train_check.py data --root "$OUT/synth" $DATA_ARGS --json "$OUT/train_data.json" \
    && touch "$OUT/synth/done"
}

train_section() {  # one torchrun train_stim.py run per autocast dtype, each checked
  local t dtype rc; t=$(section_timeout train "$T_TRAIN") || return 0
  make_data || { log "train: synthetic data failed"; return 0; }
  for dtype in $AMP_DTYPES; do
    t=$(section_timeout "train_$dtype" "$T_TRAIN") || return 0
    log "start train_$dtype (timeout ${t}s): torchrun train_stim.py --amp --amp-dtype $dtype"
    rm -rf "$OUT/train/$dtype"
    TORCH_LOGS=recompiles timeout -k 15 "$t" $TORCHRUN train_stim.py --data-dir "$OUT/synth" $TRAIN_COMMON \
      --epochs "$TRAIN_EPOCHS" --amp --amp-dtype $dtype $COMPILE_FLAG --output "$OUT/train" --experiment $dtype \
      > "$OUT/train_$dtype.log" 2>&1
    rc=$?
    log "end train_$dtype rc=$rc$( ((rc == 124)) && echo ' (timed out)')"
    ((rc == 0)) || tail -n 20 "$OUT/train_$dtype.log"
    "$PY" benchmarks/train_check.py check --run-dir "$OUT/train/$dtype" --log "$OUT/train_$dtype.log" \
      --model "$TRAIN_MODEL" --num-classes "$NUM_CLASSES" --exit-code $rc --loop-json "$OUT/loop.json" \
      --json "$OUT/train_$dtype.json" 2>&1 | tee -a "$OUT/gpu_bench.log"
  done
}

sync_section() {  # bf16: sync debug mode 'error' on the watched steps; fp16 (GradScaler): 'warn', every sync listed
  local t dtype mode rc; t=$(section_timeout sync "$T_SYNC") || return 0
  make_data || { log "sync: synthetic data failed"; return 0; }
  for dtype in $AMP_DTYPES; do
    mode=$([[ $dtype == bfloat16 ]] && echo error || echo warn)
    t=$(section_timeout "sync_$dtype" "$T_SYNC") || return 0
    log "start sync_$dtype (timeout ${t}s): sync_check.py --cuda-mode $mode"
    rm -rf "$OUT/sync/$dtype"
    timeout -k 15 "$t" $TORCHRUN benchmarks/sync_check.py --warmup-steps "$SYNC_WARMUP" --cuda-mode $mode \
      --json "$OUT/sync_$dtype.json" -- --data-dir "$OUT/synth" $TRAIN_COMMON --epochs 2 --amp --amp-dtype $dtype \
      $SYNC_COMPILE --output "$OUT/sync" --experiment $dtype > "$OUT/sync_$dtype.log" 2>&1
    rc=$?
    log "end sync_$dtype rc=$rc$( ((rc == 124)) && echo ' (timed out)')"
    grep -A12 '^\[sync check\]' "$OUT/sync_$dtype.log" | tee -a "$OUT/gpu_bench.log" || tail -n 20 "$OUT/sync_$dtype.log"
  done
}

for s in $SECTIONS; do
  case "$s" in
    r50)
      run_section r50_eager "$T_R50" $R50 $REP --subnets 1 6 --configs plain none hand st st++ st++lean ;;
    deit)
      run_section deit_eager "$T_DEIT" $DEIT $REP --subnets 1 6 --configs plain none hand st++ st++lean ;;
    compile|compile_r50|compile_deit)
      # eager rows too (same process: the ratios compare like with like); graph check folded in (resnet50)
      [[ $s == compile_deit ]] || run_section r50_compile "$T_COMPILE" $R50 $CREP $COMPILE_SET --compile \
        --compile-scope full subnets --graph-steps 12 --stim-sizes $BUCKETS
      [[ $s == compile_r50 ]] || run_section deit_compile "$T_COMPILE" $DEIT $CREP $COMPILE_SET --compile \
        --compile-scope full subnets --graph-steps 0 --stim-sizes $DEIT_BUCKETS ;;
    loop)
      LOOP_MODEL=$([[ $DEV == cuda ]] && echo "--model $TRAIN_MODEL --batch-size $TRAIN_BS --img-size 224 --device cuda \
        --amp-dtype bfloat16 --channels-last" || echo "$R50 --batch-size $TRAIN_BS")
      run_section loop "$T_LOOP" $LOOP_MODEL $LOOP_ARGS --configs plain --subnets 6 --script-loop-config st++lean \
        --script-loop-subnets 6 --script-loop-compile ;;
    train) train_section ;;
    sync) sync_section ;;
    *) log "unknown section $s (use r50, deit, compile (= compile_r50 compile_deit), loop, train, sync)" ;;
  esac
done
log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
