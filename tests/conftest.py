"""Test set-up shared by every test file.

Without a CUDA device, Triton kernels run under its interpreter: TRITON_INTERPRET=1 must be set before
anything imports triton, so it is set here, first. With a GPU the same tests run natively.
"""

import os

import torch

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
