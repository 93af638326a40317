"""vortex-hybrid: sparse attention on the GPU and the CPU at once over a paged KV cache that lives
partly in GPU memory and partly in host memory.

Kernels come in three interchangeable backends with the same functions (docs/architecture.md):
`vortex_hybrid.reference` (plain torch, the ground truth), `vortex_hybrid.cpu_kernels` (Numba) and
`vortex_hybrid.gpu_kernels` (Triton). Those import lazily: `import vortex_hybrid` stays cheap.
"""

from .config import HybridConfig
from .kv import PagedKVCache
from .runtime import HybridAttention

__version__ = "0.1.0"
__all__ = ["HybridAttention", "HybridConfig", "PagedKVCache", "__version__"]
