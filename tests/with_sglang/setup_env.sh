#!/usr/bin/env bash
# The real-SGLang test environment: a venv (default .venv-sglang at the repository root) holding
# torch 2.13.0 (CPU), sglang 0.5.17 without its dependency pins (they pin torch 2.11 and CUDA
# kernels), sglang's run-time dependencies (tests/with_sglang/requirements.txt) under a torch==2.13.0
# constraint, and this package in editable mode (its entry point is what SGLang's load_plugins()
# finds). Built once and reused while its inputs (this script, requirements.txt) are unchanged (a
# stamp file holds their hash); the editable install is refreshed every time. Quiet unless a step
# fails: pip's output goes to a log (kept as VENV/setup.log), printed in full when a step fails (pip
# reports sglang's unmet pins, deliberate here: --no-deps).
# Usage: bash tests/with_sglang/setup_env.sh [VENV]      (about 2-3 minutes the first time)
#        SGLANG_VERSION=0.5.21 bash tests/with_sglang/setup_env.sh /tmp/venv   (another version)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd); here="$root/tests/with_sglang"
venv=${1:-"$root/.venv-sglang"}
SGLANG_VERSION=${SGLANG_VERSION:-0.5.17}      # the tested version; another one for trying it
stamp=$( (cat "$here/requirements.txt" "$here/setup_env.sh"; echo "$SGLANG_VERSION") | sha256sum | cut -c1-16)
log=$(mktemp "${TMPDIR:-/tmp}/vh-sglang-setup.XXXXXX")
step() {   # run one set-up step with its output in $log; on failure show the log and stop
  if ! "$@" >>"$log" 2>&1; then
    echo "sglang test env: failed: $*" >&2
    cat "$log" >&2
    echo "sglang test env: the output above is also in $log" >&2
    exit 1
  fi
}
if [ -f "$venv/.vh-stamp" ] && [ "$(cat "$venv/.vh-stamp")" = "$stamp" ]; then
  # up to date: refresh only this package's editable install (its entry points)
  step "$venv/bin/pip" install -q --no-deps -e "$root"
  rm -f "$log"
  echo "sglang test env: $venv is up to date"; exit 0
fi
echo "sglang test env: building $venv (sglang $SGLANG_VERSION; a few minutes; log: $log)"
rm -rf "$venv"
step python3 -m venv "$venv"
step "$venv/bin/pip" install torch==2.13.0
step "$venv/bin/pip" install --no-deps "sglang==$SGLANG_VERSION"
echo "torch==2.13.0" > "$venv/constraints.txt"
step "$venv/bin/pip" install -c "$venv/constraints.txt" -r "$here/requirements.txt"
# numba comes from this package's own range (sglang's pin, 0.65.1, is never installed: --no-deps)
step "$venv/bin/pip" install -c "$venv/constraints.txt" -e "$root"
mv "$log" "$venv/setup.log"
echo "$stamp" > "$venv/.vh-stamp"
echo "sglang test env: $venv ready (sglang $SGLANG_VERSION; pip's output: $venv/setup.log)"
