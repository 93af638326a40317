#!/usr/bin/env bash
# Run the test suite natively on a CUDA machine (no Triton interpreter): every test that exercises
# CUDA when there is one (the GPU-only tests, the GPU kernels, the runtime in every placement, the
# integrations), i.e. the whole suite but the real-SGLang tests (tests/with_sglang, their own env):
#   bash scripts/gpu_check.sh [test files / pytest args; default: tests --ignore=tests/with_sglang]
# Uses $PYTHON (default python3) with this package and its test extra installed
# (pip install -e ".[test]"), runs the tests, then says how many ran natively and on which device,
# and lists what was skipped and why.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device: these tests would run interpreted')"
"$py" -c "import vortex_hybrid.gpu_kernels, vortex_hybrid.cpu_kernels, pytest, hypothesis" 2>/dev/null || {
  echo "gpu_check: install the package and its test extra first: pip install -e \".[test]\"" >&2; exit 2; }
if [ "$#" -eq 0 ]; then set -- tests --ignore=tests/with_sglang; fi
report=$(mktemp -d)/junit.xml
rc=0
"$py" -m pytest -q -p no:cacheprovider --junitxml="$report" "$@" || rc=$?
"$py" - "$report" "$rc" <<'PY'
import sys
import xml.etree.ElementTree as ET

import torch

cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
skipped = [(c, s.get("message", "")) for c in cases for s in c.findall("skipped")]
failed = sum(1 for c in cases if c.find("failure") is not None or c.find("error") is not None)
ran = len(cases) - len(skipped)
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (interpreted)"
print(f"gpu_check: {ran} tests ran natively on {device} ({ran - failed} passed, {failed} failed or "
      f"errored; {len(skipped)} skipped)")
for case, why in skipped:
    print(f"gpu_check: skipped {case.get('classname')}::{case.get('name')}: {why}")
sys.exit(int(sys.argv[2]))
PY
