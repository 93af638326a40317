#!/usr/bin/env bash
# The real-SGLang test environment: a venv (default .venv-sglang at the repository root) holding
# torch 2.13.0 (CPU), sglang 0.5.17 without its dependency pins (they pin torch 2.11 and CUDA
# kernels), sglang's run-time dependencies (tests/with_sglang/requirements.txt) under a torch==2.13.0
# constraint, and this package in editable mode (its entry point is what SGLang's load_plugins()
# finds). Built once and reused while its inputs (this script, requirements.txt) are unchanged (a
# stamp file holds their hash); the editable install is refreshed every time.
# Usage: bash tests/with_sglang/setup_env.sh [VENV]      (about 2-3 minutes the first time)
#        SGLANG_VERSION=0.5.21 bash tests/with_sglang/setup_env.sh /tmp/venv   (another version)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd); here="$root/tests/with_sglang"
venv=${1:-"$root/.venv-sglang"}
SGLANG_VERSION=${SGLANG_VERSION:-0.5.17}      # the tested version; another one for trying it
stamp=$( (cat "$here/requirements.txt" "$here/setup_env.sh"; echo "$SGLANG_VERSION") | sha256sum | cut -c1-16)
if [ -f "$venv/.vh-stamp" ] && [ "$(cat "$venv/.vh-stamp")" = "$stamp" ]; then
  # up to date: refresh only this package's editable install (its entry points)
  "$venv/bin/pip" install -q --no-deps -e "$root"
  echo "sglang test env: $venv is up to date"; exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q --no-deps "sglang==$SGLANG_VERSION"
echo "torch==2.13.0" > "$venv/constraints.txt"
"$venv/bin/pip" install -q -c "$venv/constraints.txt" -r "$here/requirements.txt"
# numba comes from this package's own range (sglang's pin, 0.65.1, is never installed: --no-deps)
"$venv/bin/pip" install -q -c "$venv/constraints.txt" -e "$root"
echo "$stamp" > "$venv/.vh-stamp"
echo "sglang test env: $venv ready (sglang $SGLANG_VERSION)"
