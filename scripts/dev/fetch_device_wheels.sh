#!/usr/bin/env bash
# Development only. Run where pip reaches the registry: downloads the pure-Python wheels the
# project's offline H100 machine lacks into .whl/ (git-ignored); name .whl in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
for pkg in pytest==9.0.3 iniconfig pluggy pygments packaging hypothesis==6.155.2 attrs sortedcontainers gguf==0.19.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
