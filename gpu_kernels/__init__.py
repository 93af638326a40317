"""GPU kernels (Triton) over GPU-resident pages, installed as `vortex_hybrid.gpu_kernels`."""

from .gather_pages import gather_pages, launch_gather_pages
from .merge_states import merge_split_states, merge_states
from .sparse_decode_attention import (dense_decode_attention, launch_sparse_decode_attention,
                                      sparse_decode_attention)
