"""`scheduler.live_rate.LiveCpuRate`: the hybrid split's CPU rate follows what steps measure."""

from __future__ import annotations

import pytest
import torch

from vortex_hybrid.scheduler.live_rate import CEILING, FLOOR, MIN_BYTES_PER_CALL, WEIGHT, LiveCpuRate

GB = 1e9


def test_moves_toward_the_measured_rate_and_keeps_its_tensor():
    r = LiveCpuRate(40 * GB, 50e-6, torch.device("cpu"))
    t = r.tensor
    # 32 calls of 32 MB in 32 x (1.6 ms + 50 us): 20 GB/s once the fixed cost is taken off
    assert r.observe(32 * 32e6, 32 * (1.6e-3 + 50e-6), 32)
    assert r.value == pytest.approx((1 - WEIGHT) * 40 * GB + WEIGHT * 20 * GB)
    assert r.tensor is t and r.tensor.item() == pytest.approx(r.value)   # graphs read this storage
    for _ in range(40):
        r.observe(32 * 32e6, 32 * (1.6e-3 + 50e-6), 32)
    assert r.value == pytest.approx(20 * GB, rel=1e-3) and r.steps == 41


def test_small_or_empty_parts_do_not_count_and_the_rate_stays_bounded():
    r = LiveCpuRate(40 * GB, 50e-6, torch.device("cpu"))
    assert not r.observe(0, 0.0, 0)
    r.observe(32 * (MIN_BYTES_PER_CALL - 1), 1e-3, 32)               # too few bytes a call
    assert r.value == 40 * GB and r.steps == 0
    for _ in range(60):
        r.observe(32 * 2e6, 32.0, 32)                                   # absurdly slow steps
    assert r.value == pytest.approx(FLOOR * 40 * GB, rel=1e-3)
    for _ in range(60):
        r.observe(32 * 2e9, 32e-3, 32)                                  # absurdly fast ones
    assert r.value == pytest.approx(CEILING * 40 * GB, rel=1e-3)


@pytest.mark.parametrize("initial,call_s", [(0.0, 1e-6), (-1.0, 1e-6), (1e9, -1.0)])
def test_bad_figures_are_refused(initial, call_s):
    with pytest.raises(ValueError, match="must be > 0"):
        LiveCpuRate(initial, call_s, torch.device("cpu"))


@pytest.mark.parametrize("whole", [True, False])
def test_hybrid_steps_feed_the_rate_their_split_plans_with(monkeypatch, whole):
    """A hybrid step whose CPU part attends host pages moves stats()["cpu_attn_bw"] (the rate the
    next step's split reads) away from the cost model's figure, whole step or not (seed 3)."""
    from vortex_hybrid.scheduler import live_rate
    from test_hybrid_attention import HKV, HQ, L, D, make
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(live_rate, "MIN_BYTES_PER_CALL", 0)     # test shapes are tiny
    attn = make("hybrid", slots=1, step_shape="subbatch", cache_prefill=False)
    gen = torch.Generator().manual_seed(3)
    rids = [attn.add_request(torch.randn(L, n, HKV, D, generator=gen).to(dev),
                             torch.randn(L, n, HKV, D, generator=gen).to(dev)) for n in (40, 45)]
    before = attn.stats()["cpu_attn_bw"]
    assert before == attn._costs.cpu_attn_bw_concurrent
    attn.plan(rids, whole_step=whole)
    for layer in range(L):
        q, kn, vn = (torch.randn(2, h, D, generator=gen).to(dev) for h in (HQ, HKV, HKV))
        attn.run(layer, q, kn, vn)
    if whole:
        attn.finish_step()
    last = attn.stats()["last_step"]
    assert last["cpu_pages"] > 0 and last["cpu_calls"] >= 1 and last["cpu_kernel_s"] > 0
    assert attn.stats()["cpu_attn_bw"] != before
    assert attn._live_cpu.tensor.item() == pytest.approx(attn.stats()["cpu_attn_bw"])
    attn.close()


def test_small_calls_teach_the_fixed_cost_of_a_call_and_big_ones_do_not():
    """Steps whose calls read little move `call_s` (and its tensor) toward their time per call
    less their bytes at the current rate, within [0, CALL_MAX]; steps of big calls leave it."""
    from vortex_hybrid.scheduler.live_rate import CALL_MAX
    r = LiveCpuRate(40 * GB, 50e-6, torch.device("cpu"))
    t = r.call_tensor
    # 32 calls of 0.4 MB taking 1 ms each: 1 ms - 0.4 MB / 40 GB/s = 0.99 ms a call
    per_call = 1e-3 - 0.4e6 / (40 * GB)
    assert r.observe(32 * 0.4e6, 32 * 1e-3, 32)
    assert r.call_s == pytest.approx((1 - WEIGHT) * 50e-6 + WEIGHT * per_call)
    assert r.value == 40 * GB and r.steps == 0 and r.call_steps == 1
    for _ in range(40):
        r.observe(32 * 0.4e6, 32 * 1e-3, 32)
    assert r.call_s == pytest.approx(per_call, rel=1e-3)
    assert r.call_tensor is t and t.item() == pytest.approx(r.call_s)   # graphs read this storage
    before = r.call_s
    r.observe(32 * 32e6, 32 * 1.6e-3, 32)                              # big calls: the rate moves
    assert r.call_s == before and r.steps == 1
    for _ in range(60):
        r.observe(1000, 1.0, 1)                                        # absurdly slow calls
    assert r.call_s == pytest.approx(CALL_MAX, rel=1e-3)
    for _ in range(60):
        r.observe(32 * 0.9e6, 1e-9, 32)                                # faster than their bytes
    assert r.call_s == pytest.approx(0.0, abs=1e-9)


def test_the_split_fetches_a_host_part_too_small_to_pay_for_the_learned_call_cost():
    """Once steps taught it that a call costs 2 ms, `hybrid`'s split fetches a host part whose
    copy takes less than that whole (the CPU then has nothing to do), one it split before (seed
    5)."""
    from test_hybrid_attention import HKV, make
    attn = make("hybrid", slots=100000)
    hb, costs = attn._head_bytes, attn._costs
    rows = 2 * HKV
    n = int(0.5e-3 * costs.h2d_bw_concurrent / hb)       # head-pages whose copy takes 0.5 ms
    gen = torch.Generator().manual_seed(5)
    miss = torch.zeros(rows, n, dtype=torch.bool)
    miss[torch.randint(0, rows, (n,), generator=gen), torch.arange(n)] = True
    miss = miss.to(attn.device)
    zero = torch.zeros(rows, device=attn.device)
    before = attn._hybrid_fetch(miss, zero, miss.sum())
    assert int(before.sum()) < int(miss.sum())           # 50 us a call: the CPU gets a share
    for _ in range(60):
        attn._live_cpu.observe(1000, 2e-3, 1)
    assert attn.stats()["cpu_call_s"] == pytest.approx(2e-3, rel=1e-3)
    after = attn._hybrid_fetch(miss, zero, miss.sum())
    assert torch.equal(after, miss)                       # all of it over the link
    attn.close()
