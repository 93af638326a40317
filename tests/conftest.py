"""Test set-up shared by every test file.

Without a CUDA device, Triton kernels run under its interpreter: TRITON_INTERPRET=1 must be set before
anything imports triton, so it is set here, first. With a GPU the same tests run natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
