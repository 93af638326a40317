"""Cost model: MachineCosts JSON and validation, the host-work split against brute force, the
quick measurement on this machine, and the per-machine cache."""

import dataclasses
import json
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from vortex_hybrid.scheduler import cost_model as cm
from vortex_hybrid.scheduler.cost_model import (DEFAULTS, GPU_FIELDS, NUMERIC, MachineCosts, predict,
                                                split_host_work, split_rows)

PAGE_BYTES = 2 * 16 * 128 * 2          # K+V of one (page, KV head), bf16, page 16, D 128


def costs(**kw) -> MachineCosts:
    return dataclasses.replace(DEFAULTS, **kw)


def brute(c, host_pages, page_bytes, gpu_bytes, cached):
    u = host_pages - cached
    return min(predict(c, n, u - n, page_bytes, gpu_bytes, cached).step_s for n in range(u + 1))


# ---- MachineCosts ----------------------------------------------------------------------------------
def test_json_round_trip():
    c = costs(source="measured", measured=("cpu_attn_bw", "cpu_call_s"), notes="x", date="2026-11-23")
    back = MachineCosts.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.measured == ("cpu_attn_bw", "cpu_call_s")


def test_save_load(tmp_path):
    DEFAULTS.save(tmp_path / "a" / "costs.json")
    assert MachineCosts.load(tmp_path / "a" / "costs.json") == DEFAULTS


@pytest.mark.parametrize("field", NUMERIC)
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1e9", None])
def test_bad_numeric_value_names_the_field(field, bad):
    d = DEFAULTS.to_dict()
    d[field] = bad
    with pytest.raises(ValueError, match=field):
        MachineCosts.from_dict(d)


def test_unknown_missing_and_inconsistent_fields():
    with pytest.raises(ValueError, match="hbm_bandwidth"):
        MachineCosts.from_dict({**DEFAULTS.to_dict(), "hbm_bandwidth": 1e12})
    d = DEFAULTS.to_dict()
    del d["cpu_call_s"]
    with pytest.raises(ValueError, match="cpu_call_s"):
        MachineCosts.from_dict(d)
    with pytest.raises(ValueError, match="cpu_attn_bw_concurrent"):
        costs(cpu_attn_bw_concurrent=DEFAULTS.cpu_attn_bw * 1.5)
    with pytest.raises(ValueError, match="source"):
        costs(source="guess")
    with pytest.raises(ValueError, match="measured"):
        costs(measured=("hbm",))
    with pytest.raises(ValueError):
        MachineCosts.from_dict([1, 2])


# ---- split -----------------------------------------------------------------------------------------
def test_all_cpu_when_pcie_is_very_slow():
    s = split_host_work(costs(h2d_bw=1e6, h2d_bw_concurrent=1e6), 500, PAGE_BYTES, 1 << 26)
    assert (s.cpu_pages, s.fetch_pages) == (500, 0) and s.pcie_s == 0


def test_all_fetch_when_cpu_is_very_slow():
    s = split_host_work(costs(cpu_attn_bw=1e6, cpu_attn_bw_concurrent=1e6), 500, PAGE_BYTES, 1 << 26)
    assert (s.cpu_pages, s.fetch_pages) == (0, 500) and s.cpu_s == 0


def test_balanced_split_finishes_together_within_one_page():
    c = DEFAULTS
    s = split_host_work(c, 4000, PAGE_BYTES, 64 << 20, cached_pages=100)
    assert 0 < s.cpu_pages < 3900 and s.cpu_pages + s.fetch_pages == 3900
    one_page = PAGE_BYTES * (1 / c.cpu_attn_bw_concurrent + 1 / c.h2d_bw_concurrent + 1 / c.hbm_bw)
    assert abs(s.cpu_s - s.gpu_s) <= one_page
    # large steps (fixed costs negligible): the concurrent rates set the CPU share, ~21 / (21 + 54)
    big = split_host_work(c, 200_000, PAGE_BYTES, 64 << 20)
    assert big.cpu_pages / 200_000 == pytest.approx(21 / 75, abs=0.01)
    assert s.step_s == pytest.approx(brute(c, 4000, PAGE_BYTES, 64 << 20, 100), rel=0, abs=0)
    for n in (s.cpu_pages - 1, s.cpu_pages + 1):      # moving a page either way is no better
        assert predict(c, n, 3900 - n, PAGE_BYTES, 64 << 20, 100).step_s >= s.step_s


def test_cached_pages_are_attended_on_the_gpu():
    s = split_host_work(DEFAULTS, 10, PAGE_BYTES, 0, cached_pages=10)
    assert (s.cpu_pages, s.fetch_pages, s.cached_pages) == (0, 0, 10) and s.gpu_s > 0 and s.cpu_s == 0
    empty = split_host_work(DEFAULTS, 0, PAGE_BYTES, 0)
    assert empty.step_s == empty.lower_bound_s == 0


COST_SETS = [DEFAULTS, costs(cpu_call_s=5e-3, gpu_launch_s=1e-3), costs(gpu_launch_s=5e-3),
             costs(cpu_attn_bw=5e9, cpu_attn_bw_concurrent=2e9, cpu_call_s=8e-3)]


@pytest.mark.parametrize("c", COST_SETS)
def test_step_time_and_bound_are_monotonic_in_host_pages(c):
    prev = None
    for h in range(0, 400):
        s = split_host_work(c, h, PAGE_BYTES, 1 << 24)
        assert s.lower_bound_s <= s.step_s + 1e-15
        if prev is not None:
            assert s.step_s >= prev.step_s and s.lower_bound_s >= prev.lower_bound_s
        prev = s


bandwidth = st.floats(1e6, 5e12)


@given(hbm=bandwidth, h2d=bandwidth, cpu=bandwidth, f_cpu=st.floats(0.01, 1), f_h2d=st.floats(0.01, 1),
       launch=st.floats(1e-7, 1e-2), call=st.floats(1e-7, 1e-2), host=st.integers(0, 120),
       cached=st.integers(0, 120), gpu_bytes=st.integers(0, 1 << 30), page=st.integers(1, 1 << 20))
def test_split_is_the_model_optimum_and_above_the_bound(hbm, h2d, cpu, f_cpu, f_h2d, launch, call,
                                                        host, cached, gpu_bytes, page):
    c = MachineCosts(hbm, h2d, cpu, cpu * f_cpu, h2d * f_h2d, launch, call)
    cached = min(cached, host)
    s = split_host_work(c, host, page, gpu_bytes, cached)
    assert s.cpu_pages + s.fetch_pages + s.cached_pages == host and min(s.cpu_pages, s.fetch_pages) >= 0
    assert s.step_s == brute(c, host, page, gpu_bytes, cached)
    assert s.lower_bound_s <= s.step_s * (1 + 1e-12)
    assert s.step_s == max(s.cpu_s, s.gpu_s) and s.gpu_s >= s.pcie_s


def test_split_rejects_bad_arguments():
    for kw in ({"host_pages": -1}, {"page_bytes": 0}, {"cached_pages": 11}, {"gpu_bytes": 1.5},
               {"host_pages": True}):
        args = {"host_pages": 10, "page_bytes": PAGE_BYTES, "gpu_bytes": 0, **kw}
        with pytest.raises(ValueError, match=next(iter(kw))):
            split_host_work(DEFAULTS, **args)


def test_split_rows_apportions_the_step_split():
    host = np.array([3001, 0, 17, 10007, 5, 2603])
    cached = np.array([10, 0, 17, 0, 0, 60])
    cpu, fetch, s = split_rows(DEFAULTS, host, PAGE_BYTES, 1 << 24, cached)
    u = host - cached
    assert 0 < s.cpu_pages < u.sum()                      # a real split, with remainders to apportion
    assert (cpu + fetch == u).all() and (cpu >= 0).all() and (fetch >= 0).all()
    assert cpu.sum() == s.cpu_pages and fetch.sum() == s.fetch_pages
    assert s == split_host_work(DEFAULTS, int(host.sum()), PAGE_BYTES, 1 << 24, int(cached.sum()))
    assert np.abs(cpu - u * s.cpu_pages / u.sum()).max() < 1
    with pytest.raises(ValueError):
        split_rows(DEFAULTS, host, PAGE_BYTES, 0, host + 1)


# ---- measurement and cache -------------------------------------------------------------------------
@pytest.mark.parametrize("inference", [False, True])
def test_measure_quick_on_this_machine(inference):
    from vortex_hybrid.cpu_kernels import launch_sparse_decode_attention
    kp = torch.zeros(1, 1, 16, 8, dtype=torch.bfloat16)          # compile outside the timing
    launch_sparse_decode_attention(torch.zeros(1, 1, 8), kp, kp, torch.zeros(1, 1, dtype=torch.int32),
                                   torch.full((1,), 16, dtype=torch.int32),
                                   torch.zeros(1, 1, 1, dtype=torch.int32))
    t0 = time.perf_counter()
    with torch.inference_mode(inference):      # callers measure under inference mode too
        c = cm.measure(quick=True)
    assert time.perf_counter() - t0 < 10
    assert c.source == "measured" and c.fingerprint == cm.machine_fingerprint() and c.date
    for name in NUMERIC:
        v = getattr(c, name)
        assert math.isfinite(v) and v > 0, name
    assert {"cpu_attn_bw", "cpu_call_s"} <= set(c.measured)
    assert 1e8 < c.cpu_attn_bw < 1e12 and c.cpu_call_s < 0.5
    if not torch.cuda.is_available():
        assert not set(GPU_FIELDS) & set(c.measured)
        assert all(getattr(c, f) == getattr(DEFAULTS, f) for f in GPU_FIELDS)
        assert "cpu_attn_bw_concurrent" not in c.measured and "hbm_bw" in c.notes
    else:
        assert set(GPU_FIELDS) <= set(c.measured), c.notes
    assert MachineCosts.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_load_or_measure_caches_per_machine(tmp_path, monkeypatch):
    calls = []

    def fake_measure(quick=True):
        calls.append(quick)
        return costs(source="measured", fingerprint=cm.machine_fingerprint(), cpu_call_s=len(calls))

    monkeypatch.setenv(cm.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cm, "measure", fake_measure)
    first = cm.load_or_measure()
    assert calls == [True] and (tmp_path / "machine_costs.json").exists()
    assert cm.load_or_measure() == first and len(calls) == 1         # cached, same machine
    monkeypatch.setattr(cm, "machine_fingerprint", lambda: "gpu=other|cpus=64|host=elsewhere")
    assert cm.load_or_measure().cpu_call_s == 2 and len(calls) == 2   # other machine: re-measured
    (tmp_path / "machine_costs.json").write_text("{not json")
    assert cm.load_or_measure().cpu_call_s == 3                       # unreadable cache: re-measured
    explicit = tmp_path / "profile.json"
    costs(h2d_bw=20e9, h2d_bw_concurrent=10e9).save(explicit)
    got = cm.load_or_measure(explicit)
    assert got.source == "file" and got.h2d_bw == 20e9 and len(calls) == 3
    explicit.write_text(json.dumps({**DEFAULTS.to_dict(), "extra": 1}))
    with pytest.raises(ValueError, match="extra"):
        cm.load_or_measure(explicit)
