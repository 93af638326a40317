#!/usr/bin/env bash
# Development only: the accuracy grid of docs/BENCHMARKS.md in one call on the project's H100
# machine (`bash scripts/dev/gpu_machine_run.sh accuracy`). Per (model, context) of ACC_RUNS, one
# `python -m vortex_hybrid.eval` (through device_model.sh, which installs the carried model pieces)
# under its own time limit, never past the step's deadline; after each, the results so far are
# combined into $OUT/accuracy.json, accuracy.md and accuracy.png (benchmarks/accuracy_table.py), so
# a run cut short costs only itself. Progress: one line per run here, the eval's own log in
# $ACC_WORK/<model>_<context>.log (its last lines are printed). Each model's conversion starts in the
# background at once (the first run of a model waits for it, outside its own limit).
#
# The sparse side runs in the `gpu` placement only: every placement selects the same pages and
# attends them exactly, so they give the same answers (measured, docs/BENCHMARKS.md).
#
# ACC_RUNS      model:context:seconds ... (default below: smollm2 first, while gemma converts;
#               gemma's 32K, the longest and least certain, last)
# ACC_FLOWS     comma list of flows (lowbit,quest,centroid,double_sparsity; add oracle where it exists)
# ACC_BUDGETS   0.02,0.05,512t,1024t,2048t        ACC_SAMPLES  20 per task (2 tasks: 40 prompts)
# ACC_MODES     dense,gpu,streaming               ACC_BATCH    40 (every prompt in one decode batch)
# ACC_MAX_NEW   12 (a 7-digit answer, its space and full stop, and some margin)
# ACC_CALIB_DIR benchmarks/calibrations: <model>_<flow>.json of each flow present is added
# ACC_DEADLINE  seconds for the whole step (500)   ACC_DEVICE cuda    ACC_EXTRA  more eval options
# ACC_WORK      /tmp/acc_runs (each run's eval.json, eval.png, log)    PY  python3
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out} PY=${PY:-python3}
runs=${ACC_RUNS:-"smollm2-135m:4096:150 smollm2-135m:8176:100 gemma3-270m:8192:120 gemma3-270m:16384:100 gemma3-270m:32756:200"}
flows=${ACC_FLOWS:-lowbit,quest,centroid,double_sparsity}
work=${ACC_WORK:-/tmp/acc_runs} deadline=${ACC_DEADLINE:-500} calib_dir=${ACC_CALIB_DIR:-benchmarks/calibrations}
mkdir -p "$OUT" "$work"
start=$(date +%s)
# the carried pieces installed once, then every model converted (GGUF to safetensors, CPU work) in
# the background from the start, so a later model's conversion overlaps the earlier models' runs
bash scripts/dev/device_model.sh true || { echo "installing the carried model pieces failed"; exit 1; }
declare -A converting
for run in $runs; do
  model=${run%%:*}
  [ -n "${converting[$model]:-}" ] && continue
  bash scripts/dev/device_model.sh "$PY" -c "from vortex_hybrid.eval.models import resolve_model; \
print(resolve_model('$model', progress=False))" > "$work/convert_$model.log" 2>&1 &
  converting[$model]=$!
done
for run in $runs; do
  IFS=: read -r model ctx limit <<< "$run"
  limit=${limit:-120}
  if [ -n "${converting[$model]:-}" ]; then
    wait "${converting[$model]}" || echo "$model: conversion failed: $(tail -1 "$work/convert_$model.log")"
    converting[$model]=""
    echo "$model: converted at $(( $(date +%s) - start )) s"
  fi
  left=$(( deadline - ($(date +%s) - start) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "$model $ctx: skipped, $left s left of the step's $deadline"; continue; fi
  calib=""
  for flow in ${flows//,/ }; do
    [ -f "$calib_dir/${model}_$flow.json" ] && calib+="${calib:+,}$calib_dir/${model}_$flow.json"
  done
  name=${model}_$ctx t0=$(date +%s)
  echo "$name: start (limit $limit s, calibrations: ${calib:-none})"
  rm -rf "${work:?}/$name"
  timeout "$limit" bash scripts/dev/device_model.sh "$PY" -m vortex_hybrid.eval --model "$model" \
    --context "$ctx" --samples "${ACC_SAMPLES:-20}" --tasks niah_single,niah_multikey \
    --modes "${ACC_MODES:-dense,gpu,streaming}" --flow "$flows" \
    --budget "${ACC_BUDGETS:-0.02,0.05,512t,1024t,2048t}" ${calib:+--calibration "$calib"} \
    --batch "${ACC_BATCH:-40}" --max-new-tokens "${ACC_MAX_NEW:-12}" --no-warmup \
    --device "${ACC_DEVICE:-cuda}" --out "$work/$name" ${ACC_EXTRA:-} > "$work/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - t0 )) s"
  tr '\r' '\n' < "$work/$name.log" | grep -v '^eval: ' | tail -4
  "$PY" benchmarks/accuracy_table.py "$work"/*/eval.json --json "$OUT/accuracy.json" \
    --md "$OUT/accuracy.md" --png "$OUT/accuracy.png" > /dev/null || echo "combining failed"
done
echo "accuracy: $(( $(date +%s) - start )) s"
