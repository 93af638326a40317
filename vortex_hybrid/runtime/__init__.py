"""The hybrid runtime: `HybridAttention` (plan once per step, run per layer) and its parts."""

from .hybrid_attention import HybridAttention

__all__ = ["HybridAttention"]
