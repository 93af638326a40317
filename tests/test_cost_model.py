"""Cost model: MachineCosts JSON and validation, the quick measurement on this machine, and the
per-machine cache."""

import dataclasses
import json
import math
import time

import pytest
import torch

from vortex_hybrid.scheduler import cost_model as cm
from vortex_hybrid.scheduler.cost_model import DEFAULTS, GPU_FIELDS, NUMERIC, MachineCosts


def costs(**kw) -> MachineCosts:
    return dataclasses.replace(DEFAULTS, **kw)


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
