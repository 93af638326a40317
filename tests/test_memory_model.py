"""The memory model: pool sizes derived from injected free memory (arithmetic written out here,
independently of `plan_memory`), refusals that name the sizes, what the runtime allocates equal to
what the plan counts, and capacity: requests up to it work, one more is refused, and the others
still equal the float64 reference afterwards."""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_hybrid_attention import HKV, HQ, L, D, P, Shadow

from vortex_hybrid import HybridAttention, HybridConfig
from vortex_hybrid.kv import OutOfPagesError
from vortex_hybrid.kv.page_pool import GIB
from vortex_hybrid.runtime.memory_model import HOST_SHARE, TAIL_PAGES, plan_memory, summary_hint

MIB = 1 << 20
PAGE = 2 * L * HKV * P * D * 4                       # K + V, every layer, float32
ROW = L * HKV * 2 * D * 4                            # quest: kmin and kmax per KV head, float32


def cfg(placement, **kw):
    kw.setdefault("summary_dtype", "float32")       # the sizes below are float32's
    return HybridConfig(page_size=P, placement=placement, flow="quest", kv_dtype="float32",
                        budget_pages=4, budget_ratio=None, **kw)


def plan(placement, gpu_free, host_avail, **kw):
    sizes = {k: kw.pop(k) for k in ("device_pages", "host_pages") if k in kw}
    return plan_memory(cfg(placement, **kw), L, HKV, D, gpu_free_bytes=gpu_free,
                       host_available_bytes=host_avail, **sizes)


def test_dense_and_gpu_take_the_free_hbm_less_the_reserve():
    free = 4 * GIB + 3 * MIB
    d = plan("dense", free, 0)
    assert d.device_pages == 3 * MIB // PAGE and d.host_pages == 0 and d.summary_bytes == 0
    g = plan("gpu", free, 0)                    # each page and its summary, and a scratch row
    assert g.device_pages == (3 * MIB - ROW) // (PAGE + ROW)
    assert g.device_bytes == g.device_pages * (PAGE + ROW) + ROW <= 3 * MIB
    g = plan("gpu", 64 * GIB, 0, gpu_memory_gib=0.002)      # the set budget, whatever is free
    assert g.device_pages == (int(0.002 * GIB) - ROW) // (PAGE + ROW)


@pytest.mark.parametrize("placement", ["offload", "hybrid", "cpu"])
def test_host_placements_fill_the_host_store_and_give_the_cache_the_rest_of_hbm(placement):
    free, avail = 4 * GIB + 40 * MIB, 10 * MIB
    p = plan(placement, free, avail)
    host = int(HOST_SHARE * avail) // PAGE
    assert p.host_pages == host
    budget = 40 * MIB
    # summary rows for the pages requests hold (host and tail pages), none for the slots (copies)
    slots = (budget - TAIL_PAGES * PAGE - (host + TAIL_PAGES + 1) * ROW) // PAGE
    assert p.gpu_cache_pages == (0 if placement == "cpu" else slots)
    assert p.device_pages == TAIL_PAGES + p.gpu_cache_pages
    assert p.summary_bytes == (host + TAIL_PAGES + 1) * ROW
    assert p.summary_on_device and p.device_bytes <= budget
    assert p.device_bytes + PAGE > budget or placement == "cpu"   # nothing left idle


@pytest.mark.parametrize("dtype,share", [("bfloat16", 2), ("float8_e4m3fn", 4)])
def test_smaller_summaries_leave_their_hbm_to_cache_slots(dtype, share):
    free, avail = 4 * GIB + 40 * MIB, 10 * MIB
    p = plan("hybrid", free, avail, summary_dtype=dtype)
    host, row = int(HOST_SHARE * avail) // PAGE, ROW // share
    slots = (40 * MIB - TAIL_PAGES * PAGE - (host + TAIL_PAGES + 1) * row) // PAGE
    assert p.gpu_cache_pages == slots > plan("hybrid", free, avail).gpu_cache_pages
    assert p.summary_bytes == (TAIL_PAGES + host + 1) * row


def test_a_cache_of_set_size_must_fit_and_explicit_pools_are_kept():
    p = plan("hybrid", 4 * GIB + 40 * MIB, 10 * MIB, gpu_cache_pages=100)
    assert p.gpu_cache_pages == 100 and p.device_pages == TAIL_PAGES + 100
    with pytest.raises(ValueError, match="gpu_cache_pages=100000 does not fit: .* holds \\d+ slots"):
        plan("hybrid", 4 * GIB + 40 * MIB, 10 * MIB, gpu_cache_pages=100000)
    p = plan("hybrid", None, 10 * MIB, device_pages=300, host_pages=50, gpu_cache_pages=20)
    assert (p.device_pages, p.host_pages, p.gpu_cache_pages, p.tail_pages) == (300, 50, 20, 280)


def test_budgets_that_do_not_fit_are_refused_naming_the_sizes():
    with pytest.raises(ValueError, match="gpu_memory_gib=10 does not fit: 8.00 GiB of GPU memory "
                                         "is free and gpu_reserve_gib=4.0"):
        plan("gpu", 8 * GIB, 0, gpu_memory_gib=10)
    with pytest.raises(ValueError, match="not more than gpu_reserve_gib=4.0"):
        plan("gpu", 3 * GIB, 0)
    with pytest.raises(ValueError, match="host_memory_gib=64 exceeds the 1.00 GiB of available"):
        plan("cpu", 8 * GIB, GIB, host_memory_gib=64)
    with pytest.raises(ValueError, match="less than the 256 tail pages"):
        plan("hybrid", 4 * GIB + MIB, GIB, summary_location="device")


def test_summaries_that_do_not_fit_beside_the_tails_go_to_host_memory_on_auto():
    tails = TAIL_PAGES * PAGE
    p = plan("hybrid", 4 * GIB + tails + 2 * MIB, 2 * GIB)   # 2 GiB of host pages: big summaries
    assert not p.summary_on_device
    assert p.gpu_cache_pages == 2 * MIB // PAGE
    assert p.host_bytes == p.host_pages * PAGE + p.summary_bytes


@pytest.mark.parametrize("placement", ["gpu", "hybrid"])
def test_the_runtime_allocates_what_the_plan_counts(placement):
    attn = HybridAttention(cfg(placement, gpu_memory_gib=0.004, host_memory_gib=0.002), L, HQ,
                           HKV, D)
    m, kv = attn.memory, attn.kv
    pool = lambda p: p.k.numel() * p.k.element_size() + p.v.numel() * p.v.element_size()
    assert pool(kv.device_pool) + attn.store.nbytes == m.device_bytes <= 0.004 * GIB
    assert pool(kv.host_pool) == m.host_pages * PAGE <= 0.002 * GIB
    assert attn.capacity()["gpu_cache_pages"] == m.gpu_cache_pages == \
        (m.device_pages - TAIL_PAGES if placement == "hybrid" else 0)
    attn.close()


@pytest.mark.parametrize("placement", ["gpu", "cpu", "hybrid"])
def test_requests_up_to_capacity_work_and_one_more_is_refused(placement):
    """Fill the store through capacity(): every request fits while capacity says so; one more
    token than it says is refused naming the sizes, and the others decode exactly afterwards."""
    host = placement != "gpu"
    attn = HybridAttention(cfg(placement, gpu_cache_pages=4 if placement == "hybrid" else None),
                           L, HQ, HKV, D, device_pages=40 if not host else 12,
                           host_pages=30 if host else None)
    shadow = Shadow(attn, 12)
    def room(cap):
        return cap["pages"] >= 6 and (cap["requests"] is None or cap["requests"] >= 1)

    rids = []
    while room(attn.capacity()):
        rids.append(shadow.add(4 * P + 1))          # the last page has room for the steps below
    cap = attn.capacity()
    assert len(rids) >= 2 and not room(cap)
    assert cap["tokens"] == cap["pages"] * P + len(rids) * (P - 1)   # each last page: P - 1 free
    more = cap["pages"] * P + P                     # beyond what the store holds
    k = torch.randn(L, more, HKV, D).to(attn.device)
    with pytest.raises(OutOfPagesError, match="pages"):
        attn.add_request(k, k)
    for _ in range(2):
        assert shadow.step(rids) < 1e-5
    attn.close()


def test_a_hint_names_float8_summaries_when_the_summaries_crowd_out_the_cache(caplog):
    free, avail = 4 * GIB + 40 * MIB, 48 * MIB             # summaries of 43 MiB of host pages
    p = plan("hybrid", free, avail)
    assert p.summary_on_device and p.summary_bytes > 0.25 * p.gpu_budget_bytes
    hint = summary_hint(cfg("hybrid"), p)
    assert hint.startswith("summary_dtype='float32': the summaries of the host store take "
                           f"{p.summary_bytes / GIB:.2f} of the 0.04 GiB of HBM")
    saved = p.summary_bytes - p.summary_bytes // 4
    assert f"would leave {saved / GIB:.2f} GiB more" in hint and f"about {saved // PAGE} pages" in hint
    for quiet in (dict(summary_dtype="float8_e4m3fn"),):
        assert summary_hint(cfg("hybrid", **quiet), plan("hybrid", free, avail, **quiet)) is None
    assert summary_hint(cfg("gpu"), plan("gpu", free, avail)) is None
    small = plan("hybrid", free, MIB)                       # summaries a small share: no hint
    assert small.summary_bytes < 0.25 * small.gpu_budget_bytes
    assert summary_hint(cfg("hybrid"), small) is None
    moved = plan("hybrid", 4 * GIB + TAIL_PAGES * PAGE + 2 * MIB, 2 * GIB)
    assert not moved.summary_on_device
    assert "do not fit in the" in summary_hint(cfg("hybrid"), moved)
    caplog.set_level("WARNING", logger="vortex_hybrid")
    attn = HybridAttention(cfg("hybrid", gpu_memory_gib=0.004, host_memory_gib=0.004), L, HQ, HKV, D)
    try:
        assert any("summary_dtype='float8_e4m3fn' would leave" in r.getMessage()
                   for r in caplog.records)
    finally:
        attn.close()


def test_lowbit_rows_count_packed_codes_and_the_hint_offers_float8_bounds_only():
    """lowbit (2 bits) per page and KV head: kmin, kmax (D values each in the summary dtype) and
    P x D codes of 2 bits (P * D / 4 bytes, whatever the dtype): the plan counts that, and the
    float8 hint shrinks the bounds only (written out here: D = 8, P = 4)."""
    free, avail = 4 * GIB + 40 * MIB, 48 * MIB
    row = L * HKV * (2 * D * 4 + P * D // 4)                  # float32 bounds + packed codes
    row8 = L * HKV * (2 * D * 1 + P * D // 4)
    lowbit = dict(flow="lowbit")
    c = HybridConfig(page_size=P, placement="hybrid", kv_dtype="float32", budget_pages=4,
                     budget_ratio=None, summary_dtype="float32", **lowbit)
    p = plan_memory(c, L, HKV, D, gpu_free_bytes=free, host_available_bytes=avail)
    rows = p.summary_bytes // row
    assert p.summary_bytes == rows * row and p.summary_float8_bytes == rows * row8
    hint = summary_hint(c, p)
    saved = p.summary_bytes - rows * row8
    assert hint is not None and f"would leave {saved / GIB:.2f} GiB more" in hint
    assert f"about {saved // PAGE} pages" in hint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_host_pools_are_zeroed_mappings_of_their_own_released_with_the_tensor(dtype):
    """`host_zeros`: from HUGE_MIN_BYTES up a pool is an anonymous mapping (zero, writable,
    contiguous, the exact size), advised for huge pages where the kernel offers them (its
    smaps entry says so), and its memory goes back when the last view of it is freed; below
    that, an ordinary tensor. A CPU PagePool's pools are made so."""
    import gc
    import re

    import psutil

    from vortex_hybrid.kv.page_pool import HUGE_MIN_BYTES, PagePool, host_zeros
    elem = torch.empty((), dtype=dtype).element_size()
    shape = (HUGE_MIN_BYTES // elem // (16 * 128) + 3, 16, 128)
    proc = psutil.Process()
    before = proc.memory_info().rss
    t = host_zeros(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert t.untyped_storage().nbytes() == math.prod(shape) * elem
    assert not bool(t.any())
    t[-1, -1, -1] = 2.0
    t[0].fill_(1.0)
    assert float(t[-1, -1, -1]) == 2.0 and float(t[0].sum()) == 16 * 128
    advise = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(advise) and "[never]" not in open(advise).read():
        start = t.data_ptr()
        maps = open("/proc/self/smaps").read().split("\n")
        for i, line in enumerate(maps):
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m and int(m.group(1), 16) <= start < int(m.group(2), 16):
                flags = next(x for x in maps[i:] if x.startswith("VmFlags:"))
                assert " hg" in flags, flags        # MADV_HUGEPAGE took
                break
        else:
            raise AssertionError("the pool's mapping is not in /proc/self/smaps")
    t.fill_(1.0)                                    # every page touched
    touched = proc.memory_info().rss
    view = t[1]
    del t
    gc.collect()
    assert float(view.sum()) == 16 * 128            # a view keeps the mapping
    del view
    gc.collect()
    after = proc.memory_info().rss
    print(f"rss: +{(touched - before) >> 20} MiB touched, +{(after - before) >> 20} MiB after")
    assert touched - after > HUGE_MIN_BYTES // 2
    small = host_zeros((3, 4), dtype)
    assert not bool(small.any()) and small.shape == (3, 4)
    pool = PagePool(1, shape[0] // 8, 8, 16, 128, dtype, "cpu", pin=False)
    assert not bool(pool.k.any()) and pool.k.is_contiguous() and pool.k.shape[1] == shape[0] // 8
