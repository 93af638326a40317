"""vortex-hybrid: sparse attention on the GPU and the CPU at once over a paged KV cache that lives
partly in GPU memory and partly in host memory.

Kernels come in three interchangeable backends with the same functions (docs/architecture.md):
`vortex_hybrid.reference` (plain torch, the ground truth), `vortex_hybrid.cpu_kernels` (Numba) and
`vortex_hybrid.gpu_kernels` (Triton). Those import lazily: `import vortex_hybrid` stays cheap.
"""

import os as _os

# Numba's OpenMP workers and torch's spin-wait for work by default; on a small machine the two pools
# spin against each other and a demo step swings between 5 ms and 1 s (2 cores, docs/BENCHMARKS.md).
# PASSIVE makes idle workers sleep. libgomp reads this once, when torch loads it: it applies only when
# vortex_hybrid is imported before torch (set OMP_WAIT_POLICY yourself otherwise); a user's value wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from .config import HybridConfig
from .kv import PagedKVCache
from .runtime import HybridAttention

__version__ = "0.1.0"
__all__ = ["HybridAttention", "HybridConfig", "PagedKVCache", "__version__"]
