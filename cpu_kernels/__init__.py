"""CPU kernels (Numba) over host-resident pages, installed as `vortex_hybrid.cpu_kernels`.

The contract functions of docs/architecture.md (names and signatures of `vortex_hybrid.reference`):
`sparse_decode_attention`, `dense_decode_attention`, `merge_states`, `topk_pages`; the CPU lowerings
of the `quest`, `centroid` and `lowbit` flows (`quest_cache`, `quest_indexer`, `centroid_cache`,
`centroid_indexer`, `lowbit_cache`, `lowbit_indexer`); token-granularity selection (`token_topk_attention`, `select_tokens`). Public
functions validate their arguments; the `launch_*` launchers skip the value checks for the runtime,
which validates once per step. Every kernel is `nogil` (callable from worker threads), cached on
disk, and parallel over Numba's threads (`set_cpu_threads`); `warmup()` compiles them all.

Importing this package registers the six lowerings (cache and indexer of `quest`, `centroid` and
`lowbit`, device "cpu") with `vortex_hybrid.vflow.lowering` (see `lowerings`). The files mirror
`vortex_hybrid.gpu_kernels`: the same concept in the file of the same name, `launch_*` unchecked.
"""

from .merge_states import merge_states
from .lowerings import (centroid_cache, centroid_indexer, lowbit_cache, lowbit_indexer, quest_cache,
                        quest_indexer)
from .sparse_decode_attention import (dense_decode_attention, launch_sparse_decode_attention,
                                      sparse_decode_attention)
from .threads import cpu_threads, set_cpu_threads
from .token_selection import launch_token_topk_attention, select_tokens, token_topk_attention
from .topk_pages import launch_topk_pages, topk_pages
from .warmup import warmup

__all__ = ["centroid_cache", "centroid_indexer", "cpu_threads", "dense_decode_attention",
           "lowbit_cache", "lowbit_indexer", "merge_states", "quest_cache", "quest_indexer", "launch_sparse_decode_attention",
           "launch_token_topk_attention", "launch_topk_pages", "select_tokens", "set_cpu_threads",
           "sparse_decode_attention", "token_topk_attention", "topk_pages", "warmup"]

