# Development only. Source this from the repository root on the project's H100 machine (no package
# registry there):  source scripts/dev/device_setup.sh
# 1. installs the wheels carried in .whl/ (pytest, hypothesis, ...; fetch them here with
#    scripts/dev/fetch_device_wheels.sh) into /tmp/site, 2. installs vortex-hybrid editable without deps
#    (the image has torch, triton, numba, psutil, pynvml).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
python3 -c "import vortex_hybrid.gpu_kernels, vortex_hybrid.cpu_kernels" || return 1
