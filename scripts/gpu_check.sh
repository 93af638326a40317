#!/usr/bin/env bash
# Run every GPU test natively on the GPU machine (no Triton interpreter):
#   bash scripts/gpu_check.sh [test files / pytest args; default: tests/test_gpu_*.py]
# Installs the carried wheels and the package (scripts/device_setup.sh), then runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
source scripts/device_setup.sh
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these tests would run interpreted')"
if [ "$#" -eq 0 ]; then set -- tests/test_gpu_*.py; fi
python3 -m pytest -q "$@"
