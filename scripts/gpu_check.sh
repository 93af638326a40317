#!/usr/bin/env bash
# Run every GPU test natively on the GPU machine (no Triton interpreter):
#   bash scripts/gpu_check.sh [extra pytest args]
# Installs the carried wheels and the package (scripts/device_setup.sh), then runs tests/test_gpu_*.py.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
source scripts/device_setup.sh
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these tests would run interpreted')"
python3 -m pytest tests/test_gpu_*.py -q "$@"
