"""`warmup()`: compile (or load from Numba's disk cache) every kernel specialisation the runtime uses.

Kernels are compiled per argument types, not per shape: one specialisation per KV storage width
(bf16 and fp16 pools travel as uint16 bits, fp32 pools as uint32) with int32 indices, float32 queries
and scores. Running each public entry point once on tiny inputs of every storage dtype compiles them
all, so the first decode step pays no compile time. The first warm-up on a machine compiles (tens of
seconds); later processes load the cached machine code (`cache=True`, next to the sources).
"""

from __future__ import annotations

import logging
import time

import torch

from .merge_states import merge_states
from .page_scoring import launch_page_scores
from .page_summaries import launch_cache
from .sparse_decode_attention import launch_sparse_decode_attention
from .threads import cpu_threads
from .token_selection import launch_token_topk_attention
from .topk_pages import launch_topk_pages

log = logging.getLogger(__name__)

STORAGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def warmup() -> float:
    """Compile every CPU kernel specialisation; returns the seconds it took."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    B, hq, hkv, P, D, N = 1, 2, 1, 2, 4, 4
    q = torch.randn(B, hq, D, generator=gen)
    page_table = torch.arange(2, dtype=torch.int32)[None]
    seq_lens = torch.tensor([3], dtype=torch.int32)
    sel = torch.tensor([[[0, 1]]], dtype=torch.int32)
    for dtype in STORAGE_DTYPES:
        k = torch.randn(N, hkv, P, D, generator=gen).to(dtype)
        v = torch.randn(N, hkv, P, D, generator=gen).to(dtype)
        o, lse = launch_sparse_decode_attention(q, k, v, page_table, seq_lens, sel)
        launch_sparse_decode_attention(q.to(dtype), k, v, page_table, seq_lens, sel)  # q decoded
        launch_token_topk_attention(q, k, v, page_table, seq_lens, sel, 2)
        codes = torch.zeros(N, hkv, P, 2 * -(-D // 8), dtype=torch.uint8)      # lowbit, 2 bits
        for quest, c in ((True, None), (False, None), (True, codes)):
            a, b = torch.zeros(N, hkv, 1, D), torch.zeros(N, hkv, 1, D)
            launch_cache(k, torch.tensor([0]), torch.tensor([1]), a, b, quest, c)
    merge_states(o, lse, o, lse)
    for summary_dtype in (torch.float32, torch.bfloat16):
        a = torch.zeros(N, hkv, 1, D, dtype=summary_dtype)
        for quest, c in ((True, None), (False, None), (True, codes)):
            scores = launch_page_scores(q, a, a, page_table, seq_lens, P, quest, c)
    launch_topk_pages(scores, 1, torch.tensor([2], dtype=torch.int32), 0, 1, split=False)
    launch_topk_pages(scores, 1, torch.tensor([2], dtype=torch.int32), 0, 1, split=True)
    seconds = time.perf_counter() - start
    log.info("CPU kernels warm (%d threads) in %.2f s", cpu_threads(), seconds)
    return seconds
