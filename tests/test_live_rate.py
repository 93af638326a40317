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
    assert not r.observe(32 * (MIN_BYTES_PER_CALL - 1), 1.0, 32)     # too few bytes a call
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
