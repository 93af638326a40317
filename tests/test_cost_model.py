"""Cost model: MachineCosts JSON, validation and per-field provenance (measured or defaulted), the
quick measurement on this machine, the per-machine cache (never a failed measurement), and the
costs each placement plans with (a warning, once, naming the defaulted figures it reads)."""

import dataclasses
import json
import logging
import math
import time

import pytest
import torch

from vortex_hybrid.config import PLACEMENTS
from vortex_hybrid.scheduler import cost_model as cm
from vortex_hybrid.scheduler.cost_model import CPU_FIELDS, DEFAULTS, NUMERIC, MachineCosts

NEED_GPU = tuple(k for k in NUMERIC if k not in CPU_FIELDS)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test's cost cache is its own folder (never the user's ~/.cache), and the once-only
    warnings start afresh."""
    monkeypatch.setenv(cm.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(cm, "_warned", set())
    return tmp_path / "cache" / "machine_costs.json"


def costs(**kw) -> MachineCosts:
    return dataclasses.replace(DEFAULTS, **kw)


# ---- MachineCosts ----------------------------------------------------------------------------------
def test_json_round_trip_keeps_which_fields_were_measured():
    c = costs(measured=("cpu_call_s", "cpu_attn_bw"), notes="x", date="2026-11-23")
    assert c.measured == ("cpu_attn_bw", "cpu_call_s")                 # NUMERIC order
    d = json.loads(json.dumps(c.to_dict()))
    assert d["measured"] == ["cpu_attn_bw", "cpu_call_s"] and d["defaulted"] == list(NEED_GPU)
    assert MachineCosts.from_dict(d) == c and c.defaulted == NEED_GPU


def test_save_load(tmp_path):
    DEFAULTS.save(tmp_path / "a" / "costs.json")
    assert MachineCosts.load(tmp_path / "a" / "costs.json") == DEFAULTS
    assert DEFAULTS.measured == () and DEFAULTS.defaulted == NUMERIC


def test_an_old_file_loads_with_its_provenance_and_without_its_one_word_source():
    """Files written before per-field provenance said source "measured" even for 2 of 7 fields:
    that word is ignored; a file without `measured` (provenance unknown) is all defaulted."""
    old = {k: getattr(DEFAULTS, k) for k in NUMERIC}
    got = MachineCosts.from_dict({**old, "source": "measured", "fingerprint": "f"})
    assert got.measured == () and got.defaulted == NUMERIC and got.fingerprint == "f"
    got = MachineCosts.from_dict({**old, "source": "measured", "measured": ["cpu_attn_bw", "cpu_call_s"]})
    assert got.measured == CPU_FIELDS and "source" not in got.to_dict()


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
    for bad in (("hbm",), "hbm_bw", ("hbm_bw", "hbm_bw"), None, [["hbm_bw"]]):
        with pytest.raises(ValueError, match=r"measured=.* must list distinct fields"):
            costs(measured=bad)
    with pytest.raises(ValueError, match=r"defaulted=\['hbm_bw'\] must list the fields not in"):
        MachineCosts.from_dict({**DEFAULTS.to_dict(), "defaulted": ["hbm_bw"]})
    with pytest.raises(ValueError):
        MachineCosts.from_dict([1, 2])


# ---- measurement and cache -------------------------------------------------------------------------
def small_cpu_inputs(monkeypatch):
    """measure() over 4 MiB sets, unpinned (fake CUDA has no pinned memory): quick CPU figures."""
    real = cm._cpu_inputs
    monkeypatch.setattr(cm, "_cpu_inputs", lambda set_bytes, n_sets, pin: real(4 * cm.MIB, n_sets, False))


def fake_cuda(monkeypatch, cuda_measure):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    monkeypatch.setattr(cm, "_cuda_measure", cuda_measure)
    small_cpu_inputs(monkeypatch)


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
    assert c.fingerprint == cm.machine_fingerprint() and c.date
    for name in NUMERIC:
        v = getattr(c, name)
        assert math.isfinite(v) and v > 0, name
    assert 1e8 < c.cpu_attn_bw < 1e12 and c.cpu_call_s < 0.5
    assert c.measured == cm.measurable(), c.notes
    assert MachineCosts.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_measure_without_cuda_labels_every_gpu_figure_defaulted(monkeypatch):
    """Only the CPU figures are measured; the concurrent CPU rate is the default (lowered to the
    measured solo rate when above it), labelled defaulted, never a ratio of the solo rate."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    small_cpu_inputs(monkeypatch)
    c = cm.measure(quick=True)
    assert c.measured == CPU_FIELDS and c.defaulted == NEED_GPU and "no CUDA" in c.notes
    assert all(getattr(c, k) == getattr(DEFAULTS, k) for k in NEED_GPU if k != "cpu_attn_bw_concurrent")
    assert c.cpu_attn_bw_concurrent == min(DEFAULTS.cpu_attn_bw_concurrent, c.cpu_attn_bw)


def test_a_failed_gpu_measurement_is_labelled_defaulted_and_never_cached(monkeypatch, own_cache,
                                                                         caplog):
    calls = []

    def boom(quick, cpu_call, cpu_bytes):
        calls.append(quick)
        raise RuntimeError("no pinned memory today")

    fake_cuda(monkeypatch, boom)
    c = cm.load_or_measure()
    assert c.measured == CPU_FIELDS and c.defaulted == NEED_GPU and "no pinned memory" in c.notes
    assert not own_cache.exists() and "not cached" in caplog.text
    assert cm.load_or_measure().measured == CPU_FIELDS and len(calls) == 2   # measured again
    with pytest.raises(ValueError, match="hbm_bw, h2d_bw, cpu_attn_bw_concurrent, h2d_bw_concurrent, "
                                         "gpu_launch_s not measured on this machine"):
        cm.save_to_cache(c)

    def works(quick, cpu_call, cpu_bytes):
        calls.append(quick)
        return {k: getattr(DEFAULTS, k) / 2 for k in NEED_GPU}

    monkeypatch.setattr(cm, "_cuda_measure", works)
    good = cm.load_or_measure()
    assert good.measured == NUMERIC and own_cache.exists() and good.device.startswith("Fake GPU")
    assert cm.load_or_measure() == good and len(calls) == 3                 # now cached


def test_load_or_measure_caches_per_machine(monkeypatch, own_cache):
    calls = []

    def fake_measure(quick=True):
        calls.append(quick)
        return costs(fingerprint=cm.machine_fingerprint(), measured=cm.measurable(), cpu_call_s=len(calls))

    monkeypatch.setattr(cm, "measure", fake_measure)
    first = cm.load_or_measure()
    assert calls == [True] and own_cache.exists()
    assert cm.load_or_measure() == first and len(calls) == 1         # cached, same machine
    monkeypatch.setattr(cm, "machine_fingerprint", lambda: "gpu=other|cpus=64|host=elsewhere")
    assert cm.load_or_measure().cpu_call_s == 2 and len(calls) == 2   # other machine: re-measured
    own_cache.write_text("{not json")
    assert cm.load_or_measure().cpu_call_s == 3                       # unreadable cache: re-measured
    unknown = {k: v for k, v in cm.cached().to_dict().items() if k not in ("measured", "defaulted")}
    own_cache.write_text(json.dumps(unknown))                          # provenance unknown
    assert cm.cached() is None and cm.load_or_measure().cpu_call_s == 4
    with pytest.raises(ValueError, match="fingerprint='elsewhere' is not this machine's"):
        cm.save_to_cache(costs(fingerprint="elsewhere", measured=NUMERIC))


# ---- the costs each placement plans with ------------------------------------------------------------
def test_every_placement_says_which_figures_it_reads():
    assert set(cm.NEEDS) == set(PLACEMENTS) and cm.NEEDS["hybrid"] == NUMERIC
    with pytest.raises(ValueError, match="placement='neo' must be one of"):
        cm.costs_for("neo")


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_placement_warns_once_which_defaulted_figures_it_relies_on(caplog):
    assert cm.costs_for("cpu") is DEFAULTS and cm.costs_for("cpu") is DEFAULTS   # nothing cached
    assert cm.costs_for("offload") is DEFAULTS
    assert cm.costs_for("gpu") is DEFAULTS and cm.costs_for("dense") is DEFAULTS  # they read none
    got = warnings_of(caplog)
    assert len(got) == 2, got
    assert "placement 'cpu' plans with default figures" in got[0] and \
        got[0].split(": ")[1].startswith("hbm_bw, cpu_attn_bw, gpu_launch_s, cpu_call_s")
    assert "placement 'offload'" in got[1] and "hbm_bw, h2d_bw, gpu_launch_s" in got[1]


def test_placements_use_this_machines_cached_costs(monkeypatch, caplog):
    def no_measure(quick=True):
        raise AssertionError("measured although cached")

    monkeypatch.setattr(cm, "measure", no_measure)
    fp = cm.machine_fingerprint()
    cm.save_to_cache(costs(fingerprint=fp, measured=NUMERIC, cpu_call_s=7e-6))
    for placement in ("cpu", "offload", "hybrid"):
        assert cm.costs_for(placement).cpu_call_s == 7e-6
    assert warnings_of(caplog) == []                                  # every figure measured
    monkeypatch.setattr(cm, "measurable", lambda: CPU_FIELDS)          # a machine without CUDA
    cm.save_to_cache(costs(fingerprint=fp, measured=CPU_FIELDS, cpu_call_s=8e-6))
    assert cm.costs_for("hybrid").cpu_call_s == 8e-6 and cm.costs_for("hybrid").cpu_call_s == 8e-6
    got = warnings_of(caplog)
    assert len(got) == 1 and "placement 'hybrid'" in got[0] and ", ".join(NEED_GPU) in got[0]
