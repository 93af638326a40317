"""CPU kernels as the runtime uses them: backend loading, lowering registration, warm-up, thread
count, concurrent calls from two Python threads, and bit-exact reads of bf16/fp16 storage."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from attention_cases import make_case, new_seed
from vortex_hybrid import HybridConfig, cpu_kernels
from vortex_hybrid.backends import load_backend
from vortex_hybrid.cpu_kernels import (cpu_threads, launch_sparse_decode_attention, set_cpu_threads,
                                       token_topk_attention, topk_pages, warmup)
from vortex_hybrid.cpu_kernels.storage_decode import decode_into
from vortex_hybrid.cpu_kernels.threads import max_threads
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
    warmup()
    before = _compiled_signatures()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, k, v, pt, sl, sel = make_case(new_seed(), dtype, 4, 128, page_size=16)
        launch_sparse_decode_attention(q, k, v, pt, sl, sel)
        token_topk_attention(q, k, v, pt, sl, sel, 5)
        summaries = {"kmin": torch.zeros(k.shape[0], 2, 1, 128),
                     "kmax": torch.zeros(k.shape[0], 2, 1, 128)}
        cpu_kernels.quest_cache(k, torch.tensor([0, 1]), summaries)
        cpu_kernels.quest_indexer(q, summaries, pt, sl, 4, 1, 2, page_size=16)
        topk_pages(torch.randn(2, 2, 1 << 15), 40, torch.tensor([1 << 15, 9], dtype=torch.int32),
                   1, 2)
    assert _compiled_signatures() == before


@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, BF16), (torch.float16, FP16)])
def test_half_storage_decodes_bit_exactly(dtype, kind):
    """All 65536 bit patterns (normals, subnormals, +-0, inf, NaN) convert exactly as torch does."""
    pool = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    bits, got_kind = storage_bits("k_pool", pool)
    assert got_kind == kind and bits.dtype == np.uint16
    assert np.shares_memory(bits, pool.view(torch.int16).numpy()), "storage was copied"
    out = np.full(bits.shape[0], np.nan, np.float32)
    decode_into(bits, kind, out)
    want = pool.float().numpy()
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


def test_thread_count_from_int_and_config():
    before = cpu_threads()
    try:
        assert set_cpu_threads(1) == 1 and cpu_threads() == 1
        assert set_cpu_threads(HybridConfig(cpu_threads=1)) == 1
        assert set_cpu_threads(10 ** 6) == max_threads() and cpu_threads() == max_threads()
        with pytest.raises(ValueError, match="threads=0 must be a positive int"):
            set_cpu_threads(0)
    finally:
        set_cpu_threads(before)


def test_one_thread_gives_the_same_state_as_all_threads():
    q, k, v, pt, sl, sel = make_case(new_seed(), torch.bfloat16, 4, 64, page_size=4, max_pages=12,
                                     num_sel=11)
    before = cpu_threads()
    try:
        set_cpu_threads(1)
        o1, l1 = launch_sparse_decode_attention(q, k, v, pt, sl, sel, chunk_slots=3)
    finally:
        set_cpu_threads(before)
    o2, l2 = launch_sparse_decode_attention(q, k, v, pt, sl, sel, chunk_slots=3)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_two_python_threads_calling_concurrently_match_serial_calls():
    seed = new_seed()
    cases = [make_case(seed + i, torch.bfloat16, 4, 64, batch=3, page_size=4, max_pages=12,
                       num_sel=9) for i in range(2)]

    def work(case):
        q, k, v, pt, sl, sel = case
        o, lse = launch_sparse_decode_attention(q, k, v, pt, sl, sel)
        o_t, lse_t = token_topk_attention(q, k, v, pt, sl, sel, 9)
        scores = torch.randn(3, 2, 500, generator=torch.Generator().manual_seed(seed))
        chosen = topk_pages(scores, 40, torch.tensor([500, 300, 12], dtype=torch.int32), 1, 2)
        return o, lse, o_t, lse_t, chosen

    serial = [work(c) for c in cases]
    results: dict[int, list] = {0: [], 1: []}
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(i):
        try:
            barrier.wait()
            for _ in range(20):
                results[i].append(work(cases[i]))
        except BaseException as exc:               # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert len(results[i]) == 20
        for got in results[i]:
            for a, b in zip(got, serial[i]):
                assert torch.equal(a, b), f"seed {seed}: thread {i} result differs from serial"


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
