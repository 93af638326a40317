"""GPU kernels (Triton) over GPU-resident pages, installed as `vortex_hybrid.gpu_kernels`."""

from .gather_pages import gather_pages, launch_gather_pages
from .merge_states import merge_split_states, merge_states
from .page_scoring import centroid_indexer, quest_indexer
from .page_summaries import centroid_cache, quest_cache
from .sparse_decode_attention import (dense_decode_attention, launch_sparse_decode_attention,
                                      sparse_decode_attention)
from .topk_pages import topk_pages
from . import lowerings  # noqa: E402,F401  (registers the flow kernels for device "cuda")
