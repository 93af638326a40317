"""CPU kernels as the runtime uses them: backend loading, lowering registration, warm-up, thread
count, concurrent calls from two Python threads, and bit-exact reads of bf16/fp16 storage."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from test_cpu_attention import make_case, new_seed
from vortex_hybrid import HybridConfig, cpu_kernels
from vortex_hybrid.backends import load_backend
from vortex_hybrid.cpu_kernels import (cpu_threads, run_sparse_decode_attention, set_cpu_threads,
                                       token_topk_attention, topk_pages, warmup)
from vortex_hybrid.cpu_kernels.storage_decode import decode_into
from vortex_hybrid.cpu_kernels.tensor_views import BF16, FP16, storage_bits
from vortex_hybrid.vflow import find_lowering


def test_load_backend_cpu_returns_this_package():
    assert load_backend("cpu") is cpu_kernels


def test_lowerings_are_registered():
    assert find_lowering("quest", "cache", "cpu") is cpu_kernels.quest_cache
    assert find_lowering("centroid", "cache", "cpu") is cpu_kernels.centroid_cache
    assert find_lowering("quest", "indexer", "cpu") is cpu_kernels.quest_indexer
    assert find_lowering("centroid", "indexer", "cpu") is cpu_kernels.centroid_indexer


def _compiled_signatures() -> dict:
    """Compiled specialisations of every Numba dispatcher in vortex_hybrid.cpu_kernels."""
    import sys

    from numba.core.registry import CPUDispatcher
    found = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("vortex_hybrid.cpu_kernels"):
            for attr, obj in vars(mod).items():
                if isinstance(obj, CPUDispatcher):
                    found[f"{name}.{attr}"] = len(obj.signatures)
    return found


def test_warmup_compiles_every_specialisation_the_runtime_uses():
    """After warmup(), decode-step calls with every storage dtype compile nothing new."""
    assert warmup() >= 0.0
    before = _compiled_signatures()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, k, v, pt, sl, sel = make_case(new_seed(), dtype, 4, 128, page_size=16)
        run_sparse_decode_attention(q, k, v, pt, sl, sel)
        token_topk_attention(q, k, v, pt, sl, sel, 5)
        summaries = {"kmin": torch.zeros(k.shape[0], 2, 1, 128),
                     "kmax": torch.zeros(k.shape[0], 2, 1, 128)}
        cpu_kernels.quest_cache(k, torch.tensor([0, 1]), summaries)
        cpu_kernels.quest_indexer(q, summaries, pt, sl, 4, 1, 2, page_size=16)
        topk_pages(torch.randn(2, 2, 1 << 15), 40, torch.tensor([1 << 15, 9], dtype=torch.int32),
                   1, 2)
    assert _compiled_signatures() == before


def test_select_pages_uses_the_cpu_lowerings_and_matches_the_interpreter():
    from vortex_hybrid.vflow import select_pages
    for flow in ("quest", "centroid"):
        assert find_lowering(flow, "indexer", "cpu") is getattr(cpu_kernels, f"{flow}_indexer")
        seed = new_seed()
        q, k, _, pt, sl, _ = make_case(seed, torch.bfloat16, 4, 64, batch=3, page_size=4,
                                       max_pages=12)
        lowered = select_pages(flow, q, k, pt, sl, 6, 1, 2)
        interpreted = select_pages(flow, q, k, pt, sl, 6, 1, 2, lower=False)
        key = lambda s: torch.where(s >= 0, s, 1 << 30).sort(dim=-1).values   # noqa: E731
        assert torch.equal(key(lowered), key(interpreted)), f"seed {seed}: {flow}"


def test_pool_views_are_cached_and_dropped_with_the_pool():
    import gc

    from vortex_hybrid.cpu_kernels import tensor_views
    pool = torch.randn(4, 2, 8, 16).to(torch.bfloat16)
    bits, _ = storage_bits("k_pool", pool)
    again, _ = storage_bits("k_pool", pool)
    assert again is bits and id(pool) in tensor_views._VIEWS
    pool[0, 0, 0, 0] = 3.0                                      # writes show through the view
    assert bits[0] == pool.view(torch.int16)[0, 0, 0, 0].item() & 0xFFFF
    key = id(pool)
    del pool, bits, again
    gc.collect()
    assert key not in tensor_views._VIEWS
    strided = torch.randn(4, 2, 8, 32)[..., ::2]                # a copy is never cached
    storage_bits("k_pool", strided)
    assert id(strided) not in tensor_views._VIEWS
