#!/usr/bin/env bash
# The whole GPU benchmark in one script: train_stim.py's CUDA paths end to end (1-process DDP over NCCL, bf16 and
# fp16, channels_last, compile, EMA, mixup, memory-lean, BN re-estimation, resume, the per-step sync check), the
# loop speed against the step benchmark, and the step cost sections (eager, compiled).
#
#   bash benchmarks/gpu_bench.sh                   # the readiness run: sync resume train loop (fits one call)
#   bash benchmarks/gpu_bench.sh compile_r50       # another section (each compile model needs a call of its own)
#
# Sections (each its own process(es), its own timeout, cut to what is left of BUDGET_S; every result is written to
# JSON as soon as it is measured, so a timeout keeps what was done). The train_stim.py runs go through
# `torchrun --nproc_per_node=1` with TIMM_STIM_SINGLE_RANK_DDP=1: a process group of one (NCCL on CUDA, gloo on
# CPU), so DDP wraps the model and the memory-lean DDP branch runs. Their common flags: $TRAIN_MODEL on the
# synthetic folder, --channels-last --model-ema --mixup 0.2 --cutmix 1.0 --stim st++ --stim-subnets 6
# --stim-memory-lean --stim-bn-recal, ST++ size buckets (--stim-sizes: a few cuDNN autotunings, not ~130).
#   sync     benchmarks/sync_check.py (eager): bf16 with torch.cuda.set_sync_debug_mode('error') on the watched
#            steps (the first sync stops the run, reported with its line), then fp16 with GradScaler and 'warn'
#            (every sync listed); each run folder then checked by benchmarks/train_check.py (exit 0, finite losses,
#            strict load into timm, the DDP / loss-scaling / BN re-estimation log lines); then a planted per-step
#            sync (--recovery-interval 1) in 'error' mode: the run must stop and name train_stim.py's line
#   resume   the fp16 run resumed in its own folder for one more epoch (--resume last.pth.tar); checked likewise
#   train    train_stim.py bf16 with --torchcompile (TORCH_LOGS=recompiles), checked with the recompile bound
#   loop     train_stim.train_one_epoch vs the step benchmark's own loop, same on-device batches, resnet50, batch
#            $TRAIN_BS, 224 px, bf16, channels_last, ST++ memory-lean M=6 with size buckets, compiled (scope
#            'full'); every bucket autotuned before either side runs: the img/s ratio
#   r50      resnet50, batch 256, 224 px, bf16 autocast, channels_last: plain / --stim none / hand loop,
#            ST, ST++ and ST++ memory-lean, M = 1 and 6 (eager)
#   deit     deit_small_patch16_224 (dynamic_img_size), batch 256, bf16: same configs, M = 1 and 6 (eager)
#   compile_r50, compile_deit (compile = both; each needs a device call of its own): eager and torch.compile
#            (inductor) of plain training against ST++ M=6 with scope 'full' (full pass compiled, subnets eager)
#            and 'subnets' (one static graph per (subnet, size)); graphs vs the bound, compile time vs plain's.
#            resnet50 with one size bucket (224: 8 subnets, 10 graphs), deit_small with two (160, 224)
# Environment: OUT (output folder), PYTHON (default: python), BUDGET_S (skip sections that would start with less
# than 30 s of it left, and cut timeouts to what is left; default 480), T_SYNC / T_PLANTED / T_RESUME / T_TRAIN /
# T_LOOP / T_R50 / T_DEIT / T_COMPILE (per-section timeouts, s; T_SYNC per dtype), REP / CREP (step_cost.py repeat
# flags for eager / compile sections), TRAIN_MODEL / TRAIN_BS / TRAIN_EPOCHS (sync, resume, train and loop sections).
# One device command may run at most 10 minutes; the default sections are sized for one call of BUDGET_S=480
# (BENCHMARKS.md, "The next GPU run").
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
OUT="${OUT:-$PWD/bench_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET_S="${BUDGET_S:-480}"
SECTIONS="${*:-sync resume train loop}"

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_bench.log"; }

{
  echo "# gpu_bench.sh $(date -Is) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1 \
    || echo "nvidia-smi: not available"
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
  CREP="${CREP:---repeats 10 --warmup 3}"
  # r50 ~210 s with the pre-warm of 129 sizes (H200, 2026-11-27), deit ~55 s; compile: plain resnet50 47 s, then
  # about one plain compile per subnet graph (not yet measured), hence one model per call
  T_R50="${T_R50:-240}"; T_DEIT="${T_DEIT:-120}"; T_COMPILE="${T_COMPILE:-540}"
  # readiness sections (estimates: ~20 s interpreter, CUDA and NCCL start, 2 epochs of 20 steps, 3 cuDNN sizes;
  # compile ~60-90 s for training and ~30 s for the eval graph)
  T_SYNC="${T_SYNC:-100}"; T_PLANTED="${T_PLANTED:-60}"; T_RESUME="${T_RESUME:-80}"; T_TRAIN="${T_TRAIN:-200}"
  T_LOOP="${T_LOOP:-150}"
  R50_BUCKETS="224"; DEIT_BUCKETS="160 224"; COMPILE_SET="--subnets 6 --configs plain st++"
  TRAIN_MODEL="${TRAIN_MODEL:-resnet50}"; TRAIN_BS="${TRAIN_BS:-64}"; TRAIN_EPOCHS="${TRAIN_EPOCHS:-2}"
  TRAIN_IMG=160; TRAIN_SIZES="96 128 160"; LOOP_IMG=224; LOOP_SIZES="96 160 224"
  # 10 classes: ST++'s standardised main logits over very few classes amplify gradients by 1 / std of the logits
  DATA_ARGS="--classes 10 --train-per-class 128 --val-per-class 12 --size 192"  # 20 steps/epoch at batch 64
  TRAIN_DEV="--workers 12 --pin-mem --log-interval 5 --stim-bn-recal 256"
  LOOP_ARGS="--repeats 10 --warmup 3 --script-loop-batches 20 --script-loop-rounds 3"
  COMPILE_FLAG="--torchcompile"; SYNC_WARMUP=8
  AMP_DTYPES="bfloat16 float16"; RESUME_DTYPE=float16; LOOP_BS=128
else
  DEV=cpu
  log "no CUDA device: CPU dry run with tiny settings"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  R50="--model resnet18 --batch-size 4 --img-size 32 --device cpu"
  DEIT="--model deit_tiny_patch16_224 --batch-size 4 --img-size 32 --device cpu"
  REP="--repeats 2 --warmup 1"
  CREP="--repeats 2 --warmup 1 --compile-backend eager"
  T_R50="${T_R50:-300}"; T_DEIT="${T_DEIT:-300}"; T_COMPILE="${T_COMPILE:-300}"
  T_SYNC="${T_SYNC:-300}"; T_PLANTED="${T_PLANTED:-300}"; T_RESUME="${T_RESUME:-300}"; T_TRAIN="${T_TRAIN:-300}"
  T_LOOP="${T_LOOP:-300}"
  R50_BUCKETS="16 24 32"; DEIT_BUCKETS="16 32"; COMPILE_SET="--subnets 2 --configs plain st++"
  TRAIN_MODEL="${TRAIN_MODEL:-resnet18}"; TRAIN_BS="${TRAIN_BS:-8}"; TRAIN_EPOCHS="${TRAIN_EPOCHS:-2}"
  TRAIN_IMG=32; TRAIN_SIZES="16 24 32"; LOOP_IMG=32; LOOP_SIZES="$TRAIN_SIZES"
  DATA_ARGS="--classes 2 --train-per-class 24 --val-per-class 8 --size 40"  # 6 steps/epoch
  TRAIN_DEV="--workers 0 --log-interval 2 --stim-bn-recal 16 --device cpu"
  LOOP_ARGS="--repeats 2 --warmup 1 --script-loop-batches 3 --script-loop-rounds 2 --compile-backend eager"
  # dynamo capture only (the eager backend): guards and recompiles as with inductor, no C++ compile on 2 cores
  COMPILE_FLAG="--torchcompile eager"; SYNC_WARMUP=2
  # CPU autocast to bfloat16 only: train_stim.py makes a GradScaler on CUDA only, and fp16 without loss scaling
  # diverges within a few steps here (the run then stops with its non-finite loss error, exit 1)
  AMP_DTYPES="bfloat16"; RESUME_DTYPE=bfloat16; LOOP_BS=$TRAIN_BS
fi
NUM_CLASSES=$([[ $DEV == cpu ]] && echo 2 || echo 10)
TRAIN_COMMON="--model $TRAIN_MODEL --num-classes $NUM_CLASSES -b $TRAIN_BS --img-size $TRAIN_IMG --channels-last \
  --model-ema --mixup 0.2 --cutmix 1.0 --stim st++ --stim-subnets 6 --stim-memory-lean --stim-sizes $TRAIN_SIZES \
  $TRAIN_DEV"
# a process group of one under torchrun (NCCL on CUDA, gloo on CPU): DDP and its memory-lean branch run
export TIMM_STIM_SINGLE_RANK_DDP=1
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"

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

check_run() {  # name run_dir log exit_code [train_check.py check flags...]: the run's files and log lines
  local name=$1 dir=$2 runlog=$3 rc=$4; shift 4
  local expect=(--expect-log "Distributed: 1 processes" --expect-log "Re-estimated BatchNorm statistics of the EMA")
  [[ $DEV == cuda && $name == *float16* && $name != *bfloat16* ]] && expect+=(--expect-log "with loss scaling")
  "$PY" benchmarks/train_check.py check --run-dir "$dir" --log "$runlog" --model "$TRAIN_MODEL" \
    --num-classes "$NUM_CLASSES" --exit-code "$rc" "${expect[@]}" "$@" --json "$OUT/check_$name.json" 2>&1 \
    | tee -a "$OUT/gpu_bench.log"
}

sync_section() {  # bf16: sync debug mode 'error' on the watched steps; fp16 (GradScaler): 'warn', every sync listed
  local t dtype mode rc
  make_data || { log "sync: synthetic data failed"; return 0; }
  for dtype in $AMP_DTYPES; do
    mode=$([[ $dtype == bfloat16 ]] && echo error || echo warn)
    t=$(section_timeout "sync_$dtype" "$T_SYNC") || return 0
    log "start sync_$dtype (timeout ${t}s): torchrun sync_check.py --cuda-mode $mode (1-process DDP)"
    rm -rf "$OUT/sync/$dtype"
    timeout -k 15 "$t" $TORCHRUN benchmarks/sync_check.py --warmup-steps "$SYNC_WARMUP" --cuda-mode $mode \
      --json "$OUT/sync_$dtype.json" -- --data-dir "$OUT/synth" $TRAIN_COMMON --epochs "$TRAIN_EPOCHS" --amp \
      --amp-dtype $dtype --output "$OUT/sync" --experiment $dtype > "$OUT/sync_$dtype.log" 2>&1
    rc=$?
    log "end sync_$dtype rc=$rc$( ((rc == 124)) && echo ' (timed out)')"
    grep -A12 '^\[sync check\]' "$OUT/sync_$dtype.log" | tee -a "$OUT/gpu_bench.log" \
    || tail -n 20 "$OUT/sync_$dtype.log"
    check_run "sync_$dtype" "$OUT/sync/$dtype" "$OUT/sync_$dtype.log" $rc
  done
  # a planted per-step sync (--recovery-interval 1: a finite check of the running sums every update) must stop the
  # 'error' run at its first watched step, with train_stim.py's line named
  t=$(section_timeout sync_planted "$T_PLANTED") || return 0
  log "start sync_planted (timeout ${t}s): sync_check.py --cuda-mode error with --recovery-interval 1 (expect exit 1)"
  rm -rf "$OUT/sync/planted"
  timeout -k 15 "$t" $TORCHRUN benchmarks/sync_check.py --warmup-steps "$SYNC_WARMUP" --cuda-mode error \
    --json "$OUT/sync_planted.json" -- --data-dir "$OUT/synth" $TRAIN_COMMON --epochs 1 --amp --amp-dtype bfloat16 \
    --recovery-interval 1 --output "$OUT/sync" --experiment planted > "$OUT/sync_planted.log" 2>&1
  rc=$?
  log "end sync_planted rc=$rc (1 expected)"
  grep -A12 '^\[sync check\]' "$OUT/sync_planted.log" | tee -a "$OUT/gpu_bench.log" \
    || tail -n 20 "$OUT/sync_planted.log"
}

resume_section() {  # the $RESUME_DTYPE sync run, resumed in its own folder for one more epoch
  local t rc dir="$OUT/sync/$RESUME_DTYPE"
  [[ -f "$dir/last.pth.tar" ]] || { log "skip resume: no $dir/last.pth.tar (run the sync section first)"; return 0; }
  t=$(section_timeout resume "$T_RESUME") || return 0
  log "start resume (timeout ${t}s): torchrun train_stim.py --resume $dir/last.pth.tar --epochs $((TRAIN_EPOCHS + 1))"
  timeout -k 15 "$t" $TORCHRUN train_stim.py --data-dir "$OUT/synth" $TRAIN_COMMON --epochs $((TRAIN_EPOCHS + 1)) \
    --amp --amp-dtype $RESUME_DTYPE --resume "$dir/last.pth.tar" --output "$OUT/sync" --experiment $RESUME_DTYPE \
    > "$OUT/resume.log" 2>&1
  rc=$?
  log "end resume rc=$rc$( ((rc == 124)) && echo ' (timed out)')"
  ((rc == 0)) || tail -n 20 "$OUT/resume.log"
  check_run "resume_$RESUME_DTYPE" "$dir" "$OUT/resume.log" $rc --expect-log "Resumed from" \
    --epochs $((TRAIN_EPOCHS + 1))
}

train_section() {  # bf16, compiled, recompiles counted
  local t rc; t=$(section_timeout train "$T_TRAIN") || return 0
  make_data || { log "train: synthetic data failed"; return 0; }
  log "start train (timeout ${t}s): torchrun train_stim.py --amp --amp-dtype bfloat16 $COMPILE_FLAG"
  rm -rf "$OUT/train/compiled"
  TORCH_LOGS=recompiles timeout -k 15 "$t" $TORCHRUN train_stim.py --data-dir "$OUT/synth" $TRAIN_COMMON \
    --epochs "$TRAIN_EPOCHS" --amp --amp-dtype bfloat16 $COMPILE_FLAG --output "$OUT/train" --experiment compiled \
    > "$OUT/train_compiled.log" 2>&1
  rc=$?
  log "end train rc=$rc$( ((rc == 124)) && echo ' (timed out)')"
  ((rc == 0)) || tail -n 20 "$OUT/train_compiled.log"
  check_run train_compiled "$OUT/train/compiled" "$OUT/train_compiled.log" $rc
}

for s in $SECTIONS; do
  case "$s" in
    sync) sync_section ;;
    resume) resume_section ;;
    train) train_section ;;
    loop)
      LOOP_MODEL=$([[ $DEV == cuda ]] && echo "--model $TRAIN_MODEL --device cuda --amp-dtype bfloat16 \
        --channels-last" || echo "--model $TRAIN_MODEL --device cpu")
      run_section loop "$T_LOOP" $LOOP_MODEL --batch-size $LOOP_BS --img-size $LOOP_IMG $LOOP_ARGS --configs plain \
        --subnets 6 --script-loop-config st++lean --script-loop-subnets 6 --script-loop-compile \
        --stim-sizes $LOOP_SIZES ;;
    r50)
      run_section r50_eager "$T_R50" $R50 $REP --subnets 1 6 --configs plain none hand st st++ st++lean ;;
    deit)
      run_section deit_eager "$T_DEIT" $DEIT $REP --subnets 1 6 --configs plain none hand st++ st++lean ;;
    compile|compile_r50|compile_deit)
      # eager rows too (same process: the ratios compare like with like); graph check folded in (resnet50)
      [[ $s == compile_deit ]] || run_section r50_compile "$T_COMPILE" $R50 $CREP $COMPILE_SET --compile \
        --compile-scope full subnets --graph-steps 0 --stim-sizes $R50_BUCKETS
      [[ $s == compile_r50 ]] || run_section deit_compile "$T_COMPILE" $DEIT $CREP $COMPILE_SET --compile \
        --compile-scope full subnets --graph-steps 0 --stim-sizes $DEIT_BUCKETS ;;
    *) log "unknown section $s (use sync, resume, train, loop, r50, deit, compile (= compile_r50 compile_deit))" ;;
  esac
done
log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
