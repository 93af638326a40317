"""`lowbit1`: the library's `lowbit` flow with 1-bit codes (gqa max), as a user flow file, for
`python -m vortex_hybrid.eval --flow docs/results/accuracy_2026-12-07b/lowbit1.py:lowbit1`."""

from vortex_hybrid.vflow import register
from vortex_hybrid.vflow.flows import LowBit


@register("lowbit1")
class LowBit1(LowBit):
    def __init__(self) -> None:
        super().__init__(bits=1)
