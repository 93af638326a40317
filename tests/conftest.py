"""Test set-up shared by every test file (the SGLang tests under with_sglang/ included).

The suite stays out of the user's home: `VORTEX_HYBRID_CACHE` (machine costs, converted models) points
at a temporary folder made for this session, before anything imports vortex_hybrid, and removed at
exit; `USER_CACHE` is the cache the user had, which tests may only read (a converted real model).

Without a CUDA device, Triton kernels run under its interpreter: TRITON_INTERPRET=1 must be set before
anything imports triton, so it is set here, first. With a GPU the same tests run natively.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "VORTEX_HYBRID_CACHE"           # scheduler.cost_model.CACHE_ENV, read at call time


def _session_cache() -> tuple[Path, Path]:
    """(this session's temporary cache, the user's cache). Made once per session: a second import
    of this module, or a test's subprocess, finds the folder through VH_TEST_CACHE and keeps it."""
    made = os.environ.get("VH_TEST_CACHE")
    if made and os.environ.get(CACHE_ENV) == made and Path(made).is_dir():
        return Path(made), Path(os.environ["VH_TEST_USER_CACHE"])
    user = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "vortex_hybrid")
    tmp = tempfile.mkdtemp(prefix="vh-test-cache-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    os.environ.update({CACHE_ENV: tmp, "VH_TEST_CACHE": tmp, "VH_TEST_USER_CACHE": user})
    return Path(tmp), Path(user)


TEST_CACHE, USER_CACHE = _session_cache()

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


_SEED = {"value": 0}


def test_seed() -> int:
    """The seed of the running test (see `_seeded`): for generators a test creates itself."""
    return _SEED["value"]


test_seed.__test__ = False           # a helper, not a test


@pytest.fixture(autouse=True)
def _seeded(request):
    """Seed torch, random and numpy for every test: VH_TEST_SEED when set, else a hash of the test's
    id (so a run is repeatable). Printed, so a failing test's captured output names it; replay with
    VH_TEST_SEED=<seed> pytest <test id>."""
    env = os.environ.get("VH_TEST_SEED")
    seed = int(env) if env else zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    _SEED["value"] = seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    print(f"test seed {seed} (replay: VH_TEST_SEED={seed})")
    yield
