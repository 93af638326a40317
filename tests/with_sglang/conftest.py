"""Set-up of the real-SGLang tests (marker `sglang`). They run in the environment that
`tests/with_sglang/setup_env.sh` builds (real sglang 0.5.17 over torch 2.13 CPU); in an environment
without sglang they are not collected.

SGLang on a CPU machine needs, none of it a patch to SGLang: `SGLANG_USE_CPU_ENGINE=1`, and the
test-only stand-ins for `sgl_kernel` and `torchvision` under tests/with_sglang/stubs on the path before
sglang or transformers is imported (also for the engine's spawned processes, through PYTHONPATH).
tests/conftest.py runs first and points VORTEX_HYBRID_CACHE at the session's temporary folder (the
engine's processes inherit it); this file checks that it did.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_session_cache = os.environ.get("VH_TEST_CACHE")
if not _session_cache or os.environ.get("VORTEX_HYBRID_CACHE") != _session_cache:
    raise pytest.UsageError("tests/conftest.py did not run first (it points VORTEX_HYBRID_CACHE "
                            "at a temporary folder, so the suite stays out of ~/.cache): run "
                            "pytest from the repository root")

STUBS = str(Path(__file__).resolve().parent / "stubs")
if importlib.util.find_spec("sglang") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    if STUBS not in sys.path:
        sys.path.insert(0, STUBS)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [STUBS] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def pytest_collection_modifyitems(items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.sglang)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_llama import write_tiny_llama
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
