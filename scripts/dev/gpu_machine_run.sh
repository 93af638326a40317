#!/usr/bin/env bash
# Development only: one call on the project's H100 machine (no package registry there): set up,
# then the named steps, logs and JSON under $OUT.
#   bash scripts/dev/gpu_machine_run.sh tests demo gpu_topk gpu_attention cpu_attention summary_store
# (TESTS="tests/test_x.py ..." limits the tests step to those files; cpu_percall times CPU attention calls
# from the main thread and from a second thread under both OMP wait policies; HYBRID_STEP_ARGS passes
# options to benchmarks/hybrid_step.py, whose full grid needs several calls; E2E_ARGS to
# benchmarks/e2e_decode.py, all of whose modes fit one call at its defaults; sglang_e2e needs the
# SGLang overlay carried in .overlay/ (build it here: bash scripts/dev/build_sglang_overlay.sh) and
# takes SGLANG_E2E_ARGS, e.g. --runs to split its engines over calls, or for the Llama-3-8B grid
# "--shape llama3-8b --time-limit 480 --resume .carry/sglang_e2e.json" with SGLANG_E2E_TIMEOUT=540
# in several calls, each carrying .carry with the last call's sglang_e2e.json (none the first
# time), until no run is skipped (sglang_graphs, the check of
# SGLang's decode graphs with the backend, likewise: SGLANG_GRAPHS_ARGS); accuracy runs the accuracy grid,
# scripts/dev/accuracy.sh, ACC_* there, writing accuracy.json/.md/.png)
# BUNDLE=1: everything under $OUT in one archive at the end (a call returns only a few files).
# e2e_grid: one benchmarks/e2e_decode.py per entry of E2E_GRID ("name=args;name=args"), each under
# E2E_RUN_TIMEOUT (past it SIGABRT: faulthandler writes every thread's stack to the log), JSON under
# $OUT/<name>, log $OUT/e2e_<name>.log.
# omp_policy: hybrid at 12 GiB per context (OMP_CONTEXTS) under each OpenMP wait policy (OMP_POLICIES:
# PASSIVE, ACTIVE, or spinN for GOMP_SPINCOUNT=N), each with --cpu-replay (a CPU part's cost per call).
# tests: the whole suite natively (GPU kernels without the interpreter; the wheel-build test is
# skipped: no registry there). Each step has its own time limit so one slow step cannot eat the call.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 VH_SKIP_WHEEL=1 OUT=${OUT:-/tmp/out}
unset TRITON_INTERPRET
mkdir -p "$OUT"
source scripts/dev/device_setup.sh || { echo "set-up failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
for step in "$@"; do
  start=$(date +%s)
  case "$step" in
    tests)         timeout ${TESTS_TIMEOUT:-480} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests} ;;
    demo)          for i in 1 2 3; do timeout 60 python3 -m vortex_hybrid.demo --batch 4 --context 32768 --repeats 5; done ;;
    gpu_topk)      timeout 200 python3 benchmarks/gpu_topk.py --out "$OUT" ;;
    gpu_attention) timeout 300 python3 benchmarks/gpu_attention.py --out "$OUT" ;;
    cpu_attention) timeout 300 python3 benchmarks/cpu_attention.py --out "$OUT" ;;
    cpu_small_parts) timeout 240 python3 benchmarks/cpu_small_parts.py --out "$OUT" ${CPU_SMALL_ARGS:-} ;;
    cpu_indexer)   timeout 200 python3 benchmarks/cpu_indexer.py --threads 1,4,15 --out "$OUT" ${CPU_INDEXER_ARGS:-} ;;
    summary_store) timeout 240 python3 benchmarks/summary_store.py --out "$OUT" ;;
    step_trace)    for p in ${TRACE_PLACEMENTS:-hybrid}; do
                     timeout 200 python3 benchmarks/step_trace.py --out "$OUT" --placement $p ${TRACE_ARGS:-}
                   done ;;
    hybrid_step)   timeout ${HYBRID_STEP_TIMEOUT:-570} python3 benchmarks/hybrid_step.py --out "$OUT" ${HYBRID_STEP_ARGS:-} ;;
    e2e_decode)    timeout ${E2E_TIMEOUT:-570} python3 benchmarks/e2e_decode.py --out "$OUT" ${E2E_ARGS:-} ;;
    e2e_grid)      IFS=';' read -ra runs <<< "${E2E_GRID:-}"     # "name=args;name=args": one e2e_decode each
                   for run in "${runs[@]}"; do
                     name=${run%%=*} args=${run#*=}
                     timeout -s ABRT ${E2E_RUN_TIMEOUT:-200} python3 -X faulthandler benchmarks/e2e_decode.py \
                       --out "$OUT/$name" $args > "$OUT/e2e_$name.log" 2>&1   # a hang dumps its stacks
                     echo "$name: exit $? ($args)"
                     grep -E "^\[|^ *(dense|gpu|cpu|offload|hybrid) |FAILED|Error" "$OUT/e2e_$name.log" | sed "s/^/$name /"
                   done ;;
    head_features) timeout 200 python3 benchmarks/head_features.py --out "$OUT" ;;
    host_contention) timeout ${HOST_CONTENTION_TIMEOUT:-240} python3 benchmarks/host_contention.py --out "$OUT" ${HOST_CONTENTION_ARGS:-} ;;
    cpu_percall)   for pol in PASSIVE ACTIVE; do for c in main worker; do   # the per-call cost question
                     OMP_WAIT_POLICY=$pol timeout 60 python3 benchmarks/host_contention.py --parts per_call \
                       --caller $c --pool-gib 16 --threads 14 --sizes-mib 1,4,32 --gaps-us 0,1000 \
                       --out "$OUT/percall_${pol}_$c" | grep "per-call" | sed "s/^/$pol $c /"
                   done; done ;;
    omp_policy)    for ctx in ${OMP_CONTEXTS:-131072}; do for pol in ${OMP_POLICIES:-PASSIVE ACTIVE}; do
                     case $pol in spin*) env_set="GOMP_SPINCOUNT=${pol#spin}";; *) env_set="OMP_WAIT_POLICY=$pol";; esac
                     env $env_set timeout ${OMP_RUN_TIMEOUT:-150} python3 benchmarks/e2e_decode.py --modes hybrid \
                       --locality real --summary-dtype bfloat16 --steps 8 --warmup 3 --gpu-memory-gib 12 \
                       --context $ctx --cpu-replay 20 --out "$OUT/omp_${ctx}_$pol" ${E2E_ARGS:-} \
                       | grep -E "cpu replay|^\[|tokens/s" | sed "s/^/$ctx $pol /"
                   done; done ;;
    handoff)       timeout 150 python3 benchmarks/handoff.py --out "$OUT" ${HANDOFF_ARGS:-} ;;
    gpu_check)     timeout ${GPU_CHECK_TIMEOUT:-540} bash scripts/gpu_check.sh ${GPU_CHECK_ARGS:-} ;;
    carry)         mkdir -p /tmp/carry && cp -v .carry/* /tmp/carry/ ;;
    eval)          timeout ${EVAL_TIMEOUT:-500} bash scripts/dev/device_model.sh python3 -m vortex_hybrid.eval \
                     --device cuda --out "$OUT/eval" ${EVAL_ARGS:-} ;;
    accuracy)      timeout $(( ${ACC_DEADLINE:-500} + 30 )) bash scripts/dev/accuracy.sh ;;
    profile)       timeout ${PROFILE_TIMEOUT:-400} bash scripts/dev/device_model.sh python3 -m vortex_hybrid.profile \
                     --device cuda --out "$OUT/profile/calib.json" ${PROFILE_ARGS:-} ;;
    sglang_e2e)    timeout ${SGLANG_E2E_TIMEOUT:-530} bash -c '
                     set -e; mkdir -p /tmp/ov
                     [ -f .overlay/sglang_0.5.17_gpu.tar.xz ] || { echo "no .overlay/sglang_0.5.17_gpu.tar.xz: build it with bash scripts/dev/build_sglang_overlay.sh and carry .overlay"; exit 2; }
                     [ -f /tmp/ov/.unpacked ] || { tar xJf .overlay/sglang_0.5.17_gpu.tar.xz -C /tmp/ov; touch /tmp/ov/.unpacked; }
                     PYTHONPATH=/tmp/ov:${PYTHONPATH:-} python3 benchmarks/sglang_e2e.py --out "$OUT" ${SGLANG_E2E_ARGS:-}' ;;
    sglang_graphs) timeout ${SGLANG_GRAPHS_TIMEOUT:-530} bash -c '
                     set -e; mkdir -p /tmp/ov
                     [ -f .overlay/sglang_0.5.17_gpu.tar.xz ] || { echo "no .overlay/sglang_0.5.17_gpu.tar.xz: build it with bash scripts/dev/build_sglang_overlay.sh and carry .overlay"; exit 2; }
                     [ -f /tmp/ov/.unpacked ] || { tar xJf .overlay/sglang_0.5.17_gpu.tar.xz -C /tmp/ov; touch /tmp/ov/.unpacked; }
                     PYTHONPATH=/tmp/ov:${PYTHONPATH:-} python3 benchmarks/sglang_graphs_check.py --out "$OUT" ${SGLANG_GRAPHS_ARGS:-}' ;;
    *) echo "unknown step $step"; continue ;;
  esac > "$OUT/$step.log" 2>&1
  rc=$?
  echo "step $step: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"
  tail -5 "$OUT/$step.log"
done
# Only a few files come back from a call: with BUNDLE=1 everything under $OUT goes into one
# archive, $OUT/all.tgz (unpack it where the files land: tar xzf all.tgz).
if [ "${BUNDLE:-0}" = 1 ]; then
  tar czf /tmp/gpu_machine_run.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/gpu_machine_run.tgz "$OUT/all.tgz"
fi
