"""The hybrid runtime: `HybridAttention` (plan once per step, run per layer) and its parts;
`FixedShape`, the shape of whole steps that share one CUDA graph per batch size."""

from .fixed_shape import FixedShape
from .hybrid_attention import HybridAttention

__all__ = ["FixedShape", "HybridAttention"]
