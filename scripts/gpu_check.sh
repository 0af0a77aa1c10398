#!/usr/bin/env bash
# scripts/gpu_check.sh (`make gpu-check`): everything only a GPU can show, in one folder, gpu-check/DATE/.
#
# Two commands, each done within 9 minutes (GPU slots give 10 a command):
#   scripts/gpu_check.sh part1   # the gpu-marked tests; `make bench` with the GPU preset -> bench/results-GPU.{json,md}
#   scripts/gpu_check.sh part2   # experiment=shakespeare_best: time to 1.45 and 1.40 on the yardstick val/loss and
#                                #   the nanoGPT-style figure; then `python -m charlm.compare recipes=gpu`, equal budget
#   scripts/gpu_check.sh         # both, one after the other (a machine without a per-command limit)
#   scripts/gpu_check.sh --dry-run [part1|part2]   # (or CPU_DRY_RUN=1) the same pack on the CPU with tiny sizes,
#                                # ~2-3 minutes, into outputs/gpu-check-dry-run/DATE/: tests the pack without a GPU
# Each part first installs the wheels carried with the checkout in .whl/ when hydra & co. are missing (a machine
# with torch and lightning and no package index): gather them on a machine with an index (docs/bench.md, Packages)
# with `python -m pip wheel --no-deps -w .whl PACKAGE ...`, and the part installs them into .whl/site and puts it
# and the checkout on PYTHONPATH.
# A step that fails or runs out of time is recorded and the part goes on; the exit status is 1 if any step failed.
# Every step has a time limit inside the part's budget (GPU_CHECK_PART_SECONDS, default 530), so a part ends in time.
#
# Environment: PY (python; default .venv/bin/python if present, else python3), GPU_CHECK_DIR (the folder),
# GPU_CHECK_EXPORT=DIR (also copy into DIR, at the end of each part, a tarball of the folder without checkpoints,
# the part's summary and the bench results: at most 5 flat files), BENCH_ARGS (more scripts/bench.py arguments),
# COMPARE_MODELS (default lstm,gru,mingru,hawk,mamba,transformer), COMPARE_SECONDS (default: what is left of
# the part split equally between them, 20-60 s each; the last models are left out when that is under 20 s).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=${CPU_DRY_RUN:-0}
EXPORT=${GPU_CHECK_EXPORT:-}
PARTS=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    part1|part2) PARTS+=("$arg") ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (part1, part2, --dry-run)" >&2; exit 2 ;;
  esac
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(part1 part2)

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1 || PY=python3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""                      # the CPU, even on a GPU machine
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}        # tiny models on a shared CPU: one thread each
  DIR=${GPU_CHECK_DIR:-outputs/gpu-check-dry-run/$(date +%F)}
else
  DIR=${GPU_CHECK_DIR:-gpu-check/$(date +%F)}
fi
mkdir -p "$DIR/logs"
BUDGET=${GPU_CHECK_PART_SECONDS:-530}
FAILED=0

install_wheels() {  # hydra-core, datasets, wandb, ... from .whl/ when they are missing
  if "$PY" -c "import hydra, omegaconf, datasets, lightning, torch" >/dev/null 2>&1; then
    echo "packages: present"; return 0
  fi
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "packages missing and no .whl/ here: gather the wheels (docs/bench.md, Packages)" >&2
    return 1
  fi
  local site=$ROOT/.whl/site
  rm -rf "$site" && "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
    || return 1
  export PYTHONPATH=$site:$PYTHONPATH
  echo "packages: installed $(ls .whl/*.whl | wc -l) wheels into .whl/site"
}

record() {  # record STEP STATUS SECONDS
  printf '| %s | %s | %s |\n' "$1" "$2" "$3" >> "$SUMMARY.steps"
  case $2 in ok) ;; *) FAILED=1 ;; esac
}

step() {  # step NAME MAX_SECONDS CMD...: run CMD with its output in logs/NAME.log, within the part's budget
  local name=$1 max=$2 t0 rc left
  shift 2
  left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  (( max > left )) && max=$left
  if (( max < 15 )); then
    echo "== $name: skipped, the part's time is up"; record "$name" "skipped (no time left)" 0; return 1
  fi
  echo "== $name (at most ${max} s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$max" "$@" > "$DIR/logs/$name.log" 2>&1
  rc=$?
  tail -n 25 "$DIR/logs/$name.log"
  local status=ok
  (( rc == 124 || rc == 137 )) && status="timed out (${max} s)"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="failed (exit $rc)"
  record "$name" "$status" $(( $(date +%s) - t0 ))
  return $rc
}

machine() {
  "$PY" - <<'EOF' 2>/dev/null || echo "unknown machine"
import os, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
print(f"{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
EOF
}

bench_cmd() {  # the command of `make bench ARGS="$*"` (make itself when it is here)
  if command -v make >/dev/null 2>&1; then
    BENCH=(make --no-print-directory bench NO_INSTALL=1 "PY=$PY" "ARGS=$*")
  else
    BENCH=("$PY" scripts/bench.py "$@")
  fi
}

part1() {
  # a module that fails to import is reported, and the gpu tests elsewhere still run
  step tests-gpu 180 "$PY" -m pytest -o addopts= -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml "$DIR/tests-gpu.xml"
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$DRY" = 1 ]; then
    bench_cmd --preset tiny --models lstm,mingru --sample-chars 20 --recompute-chars 20 --encode-mb 1 \
      --scan-shape 4x16 --scan-repeats 1 --out "$DIR/bench" ${BENCH_ARGS:-}
    step bench 300 "${BENCH[@]}"
  else
    # training pairs start only while there is time for them and for sampling, scans and encoding after them
    bench_cmd --preset gpu --steps 120 --warmup 20 --budget-s $(( left - 150 )) --out "$DIR/bench" ${BENCH_ARGS:-}
    step bench "$left" "${BENCH[@]}"
    cp "$DIR"/bench/results-* bench/ 2>/dev/null  # bench/results-GPU.{json,md}, next to the CPU figures
  fi
  {
    echo; echo "## Bench"; echo
    cat "$DIR"/bench/results-*.md 2>/dev/null || echo "(no results)"
  } >> "$SUMMARY.body"
}

part2() {
  local ttq=(experiment=shakespeare_best logger=csv "++trainer.max_time='00:00:05:00'")
  local models=${COMPARE_MODELS:-lstm,gru,mingru,hawk,mamba,transformer} extra=() thresholds=1.45,1.40
  if [ "$DRY" = 1 ]; then
    ttq+=(trainer=cpu model.embed_dim=16 model.hidden_dim=32 model.num_layers=1 data.block_size=16 data.batch_size=8
          trainer.max_steps=150 trainer.val_check_interval=30 eval.max_chars=4000 eval.window_batches=2 sample.n_chars=20)
    thresholds=3.3,1.45,1.40
    models=${COMPARE_MODELS:-lstm,mingru}
    extra=(model.hidden_dim=32 model.num_layers=1 data.block_size=16 data.batch_size=8 eval.max_chars=3000
           eval.window_batches=2 sample.n_chars=20)
  fi
  local ttq_dir=$DIR/shakespeare_best cmp_dir=$DIR/compare  # a second run of the part writes beside the first
  [ -e "$ttq_dir" ] && ttq_dir=$ttq_dir-$(date +%H%M%S)
  [ -e "$cmp_dir" ] && cmp_dir=$cmp_dir-$(date +%H%M%S)
  step shakespeare_best 420 "$PY" scripts/time_to_quality.py --thresholds "$thresholds" "${ttq[@]}" \
    "hydra.run.dir=$ttq_dir"
  # an equal budget per model from what is left of the part (~12 s more each for the final evaluation, 15 s to
  # start, 45 s for the transformer's torch.compile, which runs inside its budget); when that is under 20 s,
  # the last models of the list are left out
  local names=(${models//,/ }) n left secs compile_s
  left=$(( BUDGET - ($(date +%s) - START) - 20 ))
  while :; do
    n=${#names[@]}; compile_s=0
    [[ " ${names[*]} " == *" transformer "* ]] && compile_s=45
    secs=$(( (left - 15 - compile_s) / n - 12 ))
    [ -n "${COMPARE_SECONDS:-}" ] || [ "$DRY" = 1 ] || (( secs >= 20 || n <= 2 )) && break
    unset 'names[n-1]'
  done
  (( secs > 60 )) && secs=60
  (( secs < 15 )) && secs=15
  [ "$DRY" = 1 ] && secs=10  # the shortest seconds budget charlm.train takes
  secs=${COMPARE_SECONDS:-$secs}
  models=$(IFS=,; echo "${names[*]}")
  step compare "$left" "$PY" -m charlm.compare "models=[$models]" "budget.seconds=$secs" recipes=gpu logger=none \
    ${extra[@]+"${extra[@]}"} "hydra.run.dir=$cmp_dir"
  {
    echo; echo "## experiment=shakespeare_best"; echo
    if [ -f "$ttq_dir/time_to_quality.json" ]; then
      echo '```'; sed -n '/^time to quality/,/^written/p' "$DIR/logs/shakespeare_best.log"; echo '```'
    else
      echo "(no result: see logs/shakespeare_best.log)"
    fi
    echo; echo "## charlm.compare recipes=gpu, budget.seconds=$secs each: $models"; echo
    cat "$cmp_dir/leaderboard.md" 2>/dev/null || echo "(no leaderboard: see logs/compare.log)"
  } >> "$SUMMARY.body"
}

export_files() {  # a tarball of the folder (no checkpoints) and the headline files, flat, into $EXPORT
  [ -n "$EXPORT" ] || return 0
  mkdir -p "$EXPORT"
  tar -czf "$EXPORT/gpu-check-$PART.tar.gz" --exclude='*.ckpt' --exclude='wandb' -C "$(dirname "$DIR")" \
    "$(basename "$DIR")" 2>/dev/null
  cp "$SUMMARY" "$EXPORT/" 2>/dev/null
  [ "$PART" = part1 ] && cp "$DIR"/bench/results-* "$EXPORT/" 2>/dev/null
  return 0
}

if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PY; for the CPU rehearsal run: scripts/gpu_check.sh --dry-run" >&2
  exit 2
fi
for PART in "${PARTS[@]}"; do
  START=$(date +%s)
  SUMMARY="$DIR/summary-$PART.md"
  : > "$SUMMARY.steps"; : > "$SUMMARY.body"
  echo "== gpu_check $PART$([ "$DRY" = 1 ] && echo ' (CPU dry run)') into $DIR"
  t0=$(date +%s); install_wheels > "$DIR/logs/wheels-$PART.log" 2>&1; rc=$?
  cat "$DIR/logs/wheels-$PART.log"
  record wheels "$([ $rc = 0 ] && echo ok || echo "failed (exit $rc)")" $(( $(date +%s) - t0 ))
  if [ $rc = 0 ]; then
    "$PART"
  fi
  {
    echo "# gpu_check $PART$([ "$DRY" = 1 ] && echo ' (CPU dry run, tiny sizes: not figures)'), $(date '+%F %H:%M')"
    echo
    echo "$(machine); charlm $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)'); $(( $(date +%s) - START )) s"
    echo; echo "| step | status | seconds |"; echo "|---|---|---|"
    cat "$SUMMARY.steps" "$SUMMARY.body"
  } > "$SUMMARY"
  rm -f "$SUMMARY.steps" "$SUMMARY.body"
  export_files
  echo; cat "$SUMMARY"; echo; echo "written: $SUMMARY"
done
exit $FAILED
