#!/bin/bash
# Development only. Build a ~57 MB tar.xz holding everything sglang 0.5.17 needs on the project's
# offline H100 machine (Python 3.12, torch 2.11.0+cu130, triton 3.6, nvcc 13.0, torchvision 0.26
# already in its image).
# Usage: bash scripts/dev/build_sglang_overlay.sh [OUT.tar.xz]   (~5 min on 2 cores; ~1 GB scratch)
# Default OUT: .overlay/sglang_0.5.17_gpu.tar.xz (git-ignored), what `scripts/dev/gpu_machine_run.sh
# sglang_e2e` unpacks there; name .overlay in the device call's carry.
set -euo pipefail
here=$(dirname "$(realpath "$0")"); out=$(realpath -m "${1:-$here/../../.overlay/sglang_0.5.17_gpu.tar.xz}")
mkdir -p "$(dirname "$out")"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
plat="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
 --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
 --platform manylinux2014_x86_64 --platform any"
pip download -q --no-deps $plat -r "$here/sglang_overlay_deps.txt" -d "$work/w"
pip download -q --no-deps $plat sglang-kernel==0.4.5 -d "$work/k"       # 383 MB, cu13, built for torch 2.11
mkdir "$work/ov"
for w in "$work"/w/*.whl; do unzip -q -o "$w" -d "$work/ov"; done
# sgl_kernel: keep the Python files + sm90/common_ops (H100); drop FA3 (1.1 GB), sm100, infllm, flashmla
unzip -q -o "$work"/k/*.whl -d "$work/ov" -x 'sgl_kernel/flash_ops*' 'sgl_kernel/sm100/*' \
  'sgl_kernel/infllm_ops*' 'sgl_kernel/flashmla_ops*'
rm -f "$work/ov/xgrammar/lib/libxgrammar.a"      # 65 MB static lib, not used at run time
# flashinfer/data (JIT sources, 77 MB, ~5 MB in xz) stays: sgl_kernel's rmsnorm JIT-compiles flashinfer's norm on first use
tar cf - -C "$work/ov" . | xz -9 -T2 > "$out"
ls -la "$out"
