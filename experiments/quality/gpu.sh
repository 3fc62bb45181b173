#!/usr/bin/env bash
# One device call of the quality test (docs/quality.md, "Running it on the GPU machine"). From the repo root:
#
#   bash experiments/quality/gpu.sh all      # corpus, task, pretraining, then grid cells until the call's budget
#   bash experiments/quality/gpu.sh grid     # more grid cells (the root carried in, or still on a warm machine)
#   bash experiments/quality/gpu.sh base     # corpus, task and pretraining only
#
# The SmolLM2 study (docs/quality.md, part 1), in consecutive calls on one warm machine (issue each call at once:
# the machine stays warm 30 s after a call, and only a warm one keeps what the calls before left there):
#   bash experiments/quality/gpu.sh smol-recv   # call A: wheels installed, the GGUF's first half checked, kept
#   bash experiments/quality/gpu.sh smol        # call B: second half; join, convert, grids until the budget
#   bash experiments/quality/gpu.sh smol-grid   # calls C, D: the grids go on where they stopped
# The trainer's speed on SmolLM2 against a plain PyTorch + PEFT loop (docs/benchmarks.md), after call A the same way:
#   bash experiments/quality/gpu.sh smol-speed  # call B: second half; join, convert, python -m tools.trainer_speed
# SPEED_ROWS / SPEED_ANCHORS (zero3,zero3-liger,zero2-compile / torch-peft: what docs/benchmarks.md reports), SPEED_ARGS (more flags) change what it runs.
# SMOL_JOBS (4), SMOL_STEPS (80), SMOL_GRID_ARGS (more grid flags for both tasks), NUMBERS_ARMS (the arms of the
# numbers grid) change the plan; docs/quality.md gives the carry lists.
#
# Every mode ends by packing what must come back into $OUT (<= 8 files of <= 16 MiB: bundle.py) and a log
# ($OUT/log.txt). "all" skips the base stage when ROOT/base and ROOT/task already exist (a repeated call).
# Environment knobs: STDLIB (a standard library archive made here by prepare.py --write_archive, carried in:
# the corpus is then the same as here whatever the image's Python; unset: the image's own stdlib), QUALITY_ROOT (runs/quality), CALL_BUDGET_S (seconds from this script's start that the
# call may use, 530: leaves margin under a 600 s limit), PRETRAIN_TOKENS (100M), PRETRAIN_MAX_S (240),
# JOBS (grid cells at once, 4), GPUS (e.g. "0,1" on a 2-GPU machine); PREPARE_ARGS, TASK_ARGS, PRETRAIN_ARGS,
# GRID_ARGS: more flags for prepare, make_task, pretrain, grid. Every stage runs as a module from the repo root.
# Wheels: if .whl/ is here (built outside the repository, see docs/quality.md, and carried along), they are installed first
# (NO_WHEELS=1 skips that, e.g. to try this script on a CPU machine with smoke-sized *_ARGS).
set -uo pipefail
mode=${1:-all}
ROOT=${QUALITY_ROOT:-runs/quality}
BUDGET=${CALL_BUDGET_S:-530}
OUT=${OUT:-/tmp/quality-out}
mkdir -p "$OUT" "$ROOT"

stage() { echo "== [$SECONDS s] $*"; "$@"; }

# shellcheck disable=SC2086
run_base() {
  stage python3 -m experiments.quality.prepare --root "$ROOT" ${STDLIB:+--stdlib "$STDLIB"} ${PREPARE_ARGS:-} &&
  stage python3 -m experiments.quality.make_task --root "$ROOT" ${TASK_ARGS:-} &&
  stage python3 -m experiments.quality.pretrain --root "$ROOT" --tokens "${PRETRAIN_TOKENS:-100M}" --max_train_s "${PRETRAIN_MAX_S:-240}" \
    ${PRETRAIN_ARGS:-} &&
  stage python3 -m experiments.quality.bundle pack --root "$ROOT" --what base --out "$OUT"
}

# shellcheck disable=SC2086
run_grid() {
  local left=$((BUDGET - SECONDS - 20))
  if [ "$left" -lt 60 ]; then echo "== [$SECONDS s] no time left for grid cells"; return 0; fi
  stage python3 -m experiments.quality.grid --root "$ROOT" --jobs "${JOBS:-4}" --deadline_s "$left" ${GPUS:+--gpus "$GPUS"} ${GRID_ARGS:-}
  stage python3 -m experiments.quality.bundle pack --root "$ROOT" --what grid --out "$OUT"
  stage python3 -m experiments.quality.grid --root "$ROOT" --status ${GRID_ARGS:-}
}

SMOL=runs/smol
SMOL_BASE=models/smollm2
NUMBERS_ARMS=${NUMBERS_ARMS:-lora_qv_r64,msp_qv_paper,lora_all_r16,msp_all_third}

smol_recv() {
  local first
  first=$(python3 -c "import json, glob; r = json.load(open(glob.glob('$SMOL/gguf/*.split.json')[0])); p = r['parts'][0]
print(p['file'], p['sha256'])") || { echo "== no $SMOL/gguf/*.split.json: carry it with the first part"; return 1; }
  set -- $first
  [ "$(sha256sum "$SMOL/gguf/$1" | cut -d' ' -f1)" = "$2" ] || { echo "== $SMOL/gguf/$1 missing or corrupt"; return 1; }
  echo "== $1 is here and intact: issue the call with the second part now (the machine stays warm 30 s)"
}

smol_base() {
  if [ -f "$SMOL_BASE/model.safetensors" ]; then echo "== $SMOL_BASE already converted"; return 0; fi
  stage python3 -m experiments.quality.bundle join --src "$SMOL/gguf" --out "$SMOL/SmolLM2-135M-Instruct.Q4_1.gguf" &&
  stage python3 launch/convert_gguf.py --gguf "$SMOL/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$SMOL_BASE" --dtype fp32
}

# shellcheck disable=SC2086
smol_grid() {
  [ -f "$SMOL_BASE/model.safetensors" ] || { echo "== no $SMOL_BASE: a cold machine; start again with smol-recv"; return 3; }
  local common="--model $SMOL_BASE --steps ${SMOL_STEPS:-80} --micro_batch_size 32 --eval_steps 40 --gen_batch_size 128 --widen 2
    --jobs ${SMOL_JOBS:-4} ${GPUS:+--gpus $GPUS} ${SMOL_GRID_ARGS:-}"
  # task, its own flags; a task whose folder was not carried (finished, its results here already) is skipped
  local tasks=("docstring|--gen_max_new_tokens 64" "numbers|--gen_max_new_tokens 48 --arms $NUMBERS_ARMS") t name flags left
  for t in "${tasks[@]}"; do
    name=${t%%|*} flags=${t#*|}
    if [ ! -f "$SMOL/$name/task/manifest.json" ]; then echo "== no $SMOL/$name/task here: $name skipped"; continue; fi
    left=$((BUDGET - SECONDS - 45))
    if [ "$left" -gt 60 ]; then
      stage python3 -m experiments.quality.grid --root "$SMOL/$name" $common $flags --deadline_s "$left"
    fi
  done
  for t in "${tasks[@]}"; do
    name=${t%%|*} flags=${t#*|}
    [ -f "$SMOL/$name/task/manifest.json" ] || continue
    mkdir -p "$OUT/$name"
    # the docstring grid brings back the two adapters the report analyses; numbers none
    local pack_extra=()
    if [ "$name" = numbers ]; then pack_extra=(--adapters ""); fi
    stage python3 -m experiments.quality.bundle pack --root "$SMOL/$name" --what grid --out "$OUT/$name" "${pack_extra[@]}"
    stage python3 -m experiments.quality.grid --root "$SMOL/$name" $common $flags --status
  done
}

# shellcheck disable=SC2086
smol_speed() {
  [ -f "$SMOL_BASE/model.safetensors" ] || { echo "== no $SMOL_BASE: a cold machine; start again with smol-recv"; return 3; }
  # rows of random words longer than 256 tokens (every word is at least one SmolLM2 token): packed, one row a sequence
  stage python3 -m tools.bench --mode make-data --rows 128 --min_tokens 300 --save-dir runs/bench_smol.jsonl &&
  stage python3 -m tools.trainer_speed --model "$SMOL_BASE" --data runs/bench_smol.jsonl --out "$OUT/speed_smol.json" \
    --workdir runs/trainer_speed_smol --batch 16 --seq 256 --steps 40 --warmup 5 --repeat 2 --load_in_4bit false \
    --gradient_checkpointing false --ranks msp_all_eq_lora16 --rows "${SPEED_ROWS:-zero3,zero3-liger,zero2-compile}" \
    --anchors "${SPEED_ANCHORS:-torch-peft}" ${SPEED_ARGS:-}
}

main() {
  if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ] && [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    touch /tmp/site/.installed  # a warm machine's later calls reuse the install
  fi
  if [ -d /tmp/site ] && [ -z "${NO_WHEELS:-}" ]; then
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0
  fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  echo "== gpu.sh $mode, root $ROOT, budget ${BUDGET}s, $(date -u +%FT%TZ)"
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU', torch.cuda.device_count(), 'GPU(s)')"
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
  python3 -c "import os, sysconfig; p = sysconfig.get_path('stdlib'); has = lambda *d: os.path.isdir(os.path.join(p, *d))
print('image stdlib', p, '| test suite:', has('test', 'test_json'), '| tkinter:', has('tkinter'), '| lib2to3:', has('lib2to3'))"
  local rc=0
  case "$mode" in
    all)
      if [ -f "$ROOT/base/model.safetensors" ] && [ -f "$ROOT/task/test.jsonl" ]; then
        echo "== base and task already in $ROOT: skipping the base stage"
      else
        run_base || rc=$?
      fi
      if [ "$rc" -eq 0 ]; then run_grid || rc=$?; fi ;;
    base) run_base || rc=$? ;;
    grid) run_grid || rc=$? ;;
    smol-recv) smol_recv || rc=$? ;;
    smol) smol_base && smol_grid || rc=$? ;;
    smol-grid) smol_grid || rc=$? ;;
    smol-speed) smol_base && smol_speed || rc=$? ;;
    *) echo "usage: bash experiments/quality/gpu.sh all|base|grid|smol-recv|smol|smol-grid|smol-speed"; return 2 ;;
  esac
  echo "== [$SECONDS s] done (exit $rc); \$OUT holds: $(ls "$OUT" | tr '\n' ' ')"
  return "$rc"
}

main 2>&1 | tee -a "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
