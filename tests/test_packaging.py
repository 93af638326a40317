"""Packaging: the component folders install as vortex_hybrid subpackages, from an editable install
and from a built wheel, and nothing named scheduler/predictors lands at the top of site-packages."""

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = {"cpu_kernels": "vortex_hybrid.cpu_kernels", "gpu_kernels": "vortex_hybrid.gpu_kernels",
              "scheduler": "vortex_hybrid.scheduler", "predictors": "vortex_hybrid.predictors"}
IMPORT_ALL = "; ".join(f"import {m}" for m in COMPONENTS.values()) + \
    "; import importlib.util as u; assert u.find_spec('scheduler') is None; " \
    "assert u.find_spec('predictors') is None; import vortex_hybrid.scheduler as s; print(s.__file__)"


def _listed_packages():
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_listed_in_pyproject():
    listed = _listed_packages()
    found = set()
    for top, name in [("vortex_hybrid", "vortex_hybrid")] + list(COMPONENTS.items()):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name,) + rel))
    assert found <= listed, f"add to pyproject.toml packages: {sorted(found - listed)}"


def test_editable_install_imports_components_outside_the_repo(tmp_path):
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == ROOT / "scheduler"


@pytest.mark.skipif(os.environ.get("VH_SKIP_WHEEL") == "1", reason="VH_SKIP_WHEEL=1 (no registry)")
def test_built_wheel_maps_components_under_vortex_hybrid(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("vortex_hybrid-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"vortex_hybrid", wheel.name.split("-py")[0] + ".dist-info"}, tops
    for mod in COMPONENTS.values():
        assert mod.replace(".", "/") + "/__init__.py" in names
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr
    code = "import sys; sys.path.insert(0, %r); " % str(target) + IMPORT_ALL
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr   # the wheel's copy comes first on sys.path:
    assert str(target) in out.stdout
