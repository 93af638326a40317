"""GPU kernels (Triton) over GPU-resident pages, installed as `vortex_hybrid.gpu_kernels`.

They need a CUDA device, or Triton's interpreter (`TRITON_INTERPRET=1` set before anything imports
triton, as tests/conftest.py does on machines without a GPU).
"""

import os as _os

import torch as _torch

if not _torch.cuda.is_available() and _os.environ.get("TRITON_INTERPRET") != "1":
    raise ImportError("vortex_hybrid.gpu_kernels needs a CUDA device, or TRITON_INTERPRET=1 set before "
                      "triton is imported (to run the kernels in Triton's interpreter on the CPU); "
                      "the CPU kernels are vortex_hybrid.cpu_kernels")

from .gather_pages import gather_pages, launch_gather_pages
from .merge_states import merge_split_states, merge_states
from .lowerings import (centroid_cache, centroid_indexer, lowbit_cache, lowbit_indexer, quest_cache,
                        quest_indexer)
from .sparse_decode_attention import (dense_decode_attention, launch_sparse_decode_attention,
                                      sparse_decode_attention)
from .topk_pages import topk_pages
