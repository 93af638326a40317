"""Step shapes: layer DAGs and their predictions against hand-computed times and against
`cost_model.predict`; the shape chooser's exploration, exploitation, moving average and input checks."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from conftest import test_seed
from vortex_hybrid.scheduler.cost_model import DEFAULTS, predict

from vortex_hybrid.scheduler import step_shape as ss
from vortex_hybrid.scheduler.list_scheduler import schedule

ShapeChooser, layer_tasks, predict_layer = ss.ShapeChooser, ss.layer_tasks, ss.predict_layer

# round figures, so the times below are computed by hand (ms)
COSTS = dataclasses.replace(DEFAULTS, hbm_bw=1000e9, h2d_bw=50e9, h2d_bw_concurrent=40e9,
                            cpu_attn_bw=40e9, cpu_attn_bw_concurrent=20e9, gpu_launch_s=100e-6,
                            cpu_call_s=50e-6)
LAYER = dict(select_s=1e-3, cpu_bytes=200e6, fetch_bytes=40e6, gpu_bytes=1e9, merge_s=50e-6,
             handoff_s=300e-6)
MS = 1e-3


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_cpu_bound_layer_by_hand():
    """Both host consumers run: cpu 0.05 + 200e6/20e9 = 10.05 ms, fetch 0.1 + 40e6/40e9 = 1.1 ms,
    attend 0.1 + 1e9/1e12 = 1.1 ms, attend fetched 0.1 + 40e6/1e12 = 0.14 ms, merge 0.05 ms.
    split: select 0-1, handoff 1-1.3, cpu 1.3-11.35, merge 11.35-11.4.
    subbatch: select C 0-0.5, handoff C 0.5-0.8, cpu 0.8-10.85, merge 10.85-10.9: the CPU starts
    select G's 0.5 ms earlier."""
    s = schedule(layer_tasks("split", COSTS, **LAYER))
    want = {"select": 0, "handoff": 1, "cpu": 1.3, "fetch": 1.3, "attend": 1.3,
            "attend fetched": 2.4, "merge": 11.35}
    assert all(close(s.start[n], t * MS) for n, t in want.items()), s.start
    assert close(s.makespan_s, 11.4 * MS)
    assert s.critical_path == ("select", "handoff", "cpu", "merge")
    b = schedule(layer_tasks("subbatch", COSTS, **LAYER))
    want = {"select C": 0, "handoff C": 0.5, "cpu": 0.8, "select G": 0.5, "handoff G": 1,
            "fetch": 1.3, "attend": 1.3, "attend fetched": 2.4, "merge": 10.85}
    assert all(close(b.start[n], t * MS) for n, t in want.items()), b.start
    assert close(b.makespan_s, 10.9 * MS)
    assert close(predict_layer("split", COSTS, **LAYER) - predict_layer("subbatch", COSTS, **LAYER),
                 0.5 * LAYER["select_s"])


def test_cpu_first_fraction_moves_the_cpu_start():
    for f in (0.0, 0.25, 1.0):
        b = schedule(layer_tasks("subbatch", COSTS, **LAYER, cpu_first_fraction=f))
        assert close(b.start["cpu"], f * LAYER["select_s"] + LAYER["handoff_s"])
        assert close(b.makespan_s, (f + 0.3 + 10.05 + 0.05) * MS)


def test_without_cpu_work_both_shapes_take_the_gpu_only_time():
    """cpu_bytes = 0: solo rates, fetch 0.1 + 40e6/50e9 = 0.9 ms, attend 1.1 ms, attend fetched
    0.14 ms, no merge: 1 + 0.3 + 1.1 + 0.14 = 2.54 ms. subbatch pays its second handoff only when
    handoff C outlasts select G (0.5 ms)."""
    gpu_only = dict(LAYER, cpu_bytes=0)
    split, sub = (predict_layer(s, COSTS, **gpu_only) for s in ("split", "subbatch"))
    assert close(split, 2.54 * MS) and close(sub, split)
    slow = dict(gpu_only, handoff_s=0.8e-3)      # handoff C 0.5-1.3, handoff G 1.3-2.1: +0.3 ms
    split, sub = (predict_layer(s, COSTS, **slow) for s in ("split", "subbatch"))
    assert close(split, 3.04 * MS) and close(sub, 3.34 * MS)
    assert 0 <= sub - split <= slow["handoff_s"]


def test_split_is_select_handoff_and_the_cost_model_step():
    """With merge_s = 0, a "split" layer is select + handoff + cost_model.predict's step (same
    charges), for any split of any pages."""
    rng = random.Random(test_seed())
    page = 2 * 16 * 128 * 2
    for _ in range(200):
        cpu, h2d = rng.uniform(5e9, 60e9), rng.uniform(5e9, 60e9)
        c = dataclasses.replace(DEFAULTS, cpu_attn_bw=cpu, h2d_bw=h2d,
                                cpu_attn_bw_concurrent=cpu * rng.uniform(0.2, 1),
                                h2d_bw_concurrent=h2d * rng.uniform(0.2, 1),
                                gpu_launch_s=rng.uniform(1e-7, 2e-4), cpu_call_s=rng.uniform(1e-7, 1e-4))
        n_cpu, n_fetch, g = (rng.choice([0, rng.randint(1, 5000)]) for _ in range(3))
        sel, hand = rng.uniform(0, 1e-3), rng.uniform(0, 1e-3)
        got = predict_layer("split", c, select_s=sel, cpu_bytes=n_cpu * page,
                            fetch_bytes=n_fetch * page, gpu_bytes=g * page, merge_s=0, handoff_s=hand)
        want = sel + hand + predict(c, n_cpu, n_fetch, page, g * page).step_s
        assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-15)
        sub = predict_layer("subbatch", c, select_s=sel, cpu_bytes=n_cpu * page,
                            fetch_bytes=n_fetch * page, gpu_bytes=g * page, merge_s=0, handoff_s=hand)
        assert sub <= got + hand + 1e-12          # at most the second handoff more


@pytest.mark.parametrize("kw, match", [
    (dict(shape="neo"), "shape='neo'"),
    (dict(cpu_bytes=-1), "cpu_bytes=-1"),
    (dict(select_s=math.nan), "select_s=nan"),
    (dict(handoff_s=math.inf), "handoff_s=inf"),
    (dict(gpu_bytes=True), "gpu_bytes=True"),
    (dict(cpu_first_fraction=1.5), "cpu_first_fraction=1.5"),
    (dict(costs={"hbm_bw": 1}), "MachineCosts"),
])
def test_bad_layer_inputs_name_the_value(kw, match):
    args = {**LAYER, "shape": "split", "costs": COSTS, **kw}
    with pytest.raises(ValueError, match=match):
        layer_tasks(args.pop("shape"), args.pop("costs"), **args)


# ---- chooser ---------------------------------------------------------------------------------------
def explore(chooser, key, predicted=None, seconds=None):
    """The shapes chosen while exploring, each recorded with seconds[shape] (default 1.0)."""
    out = []
    for _ in range(len(chooser.shapes) * chooser.explore_steps):
        s = chooser.choose(key, predicted)
        out.append(s)
        chooser.record(key, s, (seconds or {}).get(s, 1.0))
    return out


def test_exploration_order():
    assert explore(ShapeChooser(), "k") == ["split", "subbatch", "split", "subbatch"]
    assert explore(ShapeChooser(), "k", {"split": 2.0, "subbatch": 1.0}) == \
        ["subbatch", "split", "subbatch", "split"]
    assert explore(ShapeChooser(("subbatch", "split"), explore_steps=1), "k") == ["subbatch", "split"]


def test_exploitation_follows_measurements_not_predictions():
    ch = ShapeChooser()
    explore(ch, (8, "hybrid"), seconds={"split": 1e-3, "subbatch": 2e-3})
    assert ch.choose((8, "hybrid"), {"split": 9.0, "subbatch": 1e-6}) == "split"
    assert ch.choose((8, "hybrid")) == "split"
    assert ch.choose((16, "hybrid")) == "split"          # a new key explores again
    assert ch.choose((16, "hybrid"), {"split": 2.0, "subbatch": 1.0}) == "subbatch"
    for _ in range(4):                   # split measures slower now: its ema passes subbatch's
        ch.record((8, "hybrid"), "split", 5e-3)
    assert ch.choose((8, "hybrid")) == "subbatch"


def test_ema_exact():
    ch = ShapeChooser(alpha=0.5)
    for x in (4.0, 2.0, 1.0):           # 4, then 0.5 * 2 + 0.5 * 4 = 3, then 0.5 * 1 + 0.5 * 3 = 2
        ch.record("k", "split", x)
    ch.record("k", "subbatch", 0.25)
    assert ch.summary() == {"k": {"split": {"n": 3, "ema": 2.0}, "subbatch": {"n": 1, "ema": 0.25}}}
    ch = ShapeChooser()                 # alpha 0.3: 1, then 0.3 * 2 + 0.7 * 1 = 1.3
    ch.record("k", "subbatch", 1.0)
    ch.record("k", "subbatch", 2.0)
    assert ch.summary() == {"k": {"split": {"n": 0, "ema": None},
                                  "subbatch": {"n": 2, "ema": pytest.approx(1.3, rel=1e-15)}}}


@pytest.mark.parametrize("shape, seconds, match", [
    ("neo", 1.0, "shape='neo'"), ("split", -1.0, "seconds=-1.0"), ("split", math.nan, "seconds=nan"),
    ("split", math.inf, "seconds=inf"), ("split", "1", "seconds='1'"), ("split", None, "seconds=None"),
])
def test_bad_record_names_the_value(shape, seconds, match):
    ch = ShapeChooser()
    with pytest.raises(ValueError, match=match):
        ch.record("k", shape, seconds)
    assert ch.summary() == {}


def test_bad_chooser_inputs_name_the_value():
    for kw, match in ((dict(alpha=0), "alpha=0"), (dict(alpha=1.5), "alpha=1.5"),
                      (dict(explore_steps=0), "explore_steps=0"),
                      (dict(shapes=("split", "split")), "shapes="), (dict(shapes=()), "shapes=")):
        with pytest.raises(ValueError, match=match):
            ShapeChooser(**kw)
    ch = ShapeChooser()
    with pytest.raises(ValueError, match=r"key=\[8\]"):
        ch.choose([8])
    with pytest.raises(ValueError, match="shape='neo'"):
        ch.choose("k", {"neo": 1.0})
    with pytest.raises(ValueError, match=r"predicted\['split'\]=-2"):
        ch.choose("k", {"split": -2})


def test_launch_order_hands_out_the_longer_chain_first():
    """The CPU's hand-off goes first when CPU attention is the longer chain, the GPU's (fetch, then
    attention) when the copy is; with nothing to do on the CPU, the GPU's."""
    costs = DEFAULTS
    lo = ss.launch_order
    assert lo(costs, cpu_bytes=50e6, fetch_bytes=5e6, gpu_bytes=1e6, launch_s=30e-6) == ("cpu", "gpu")
    assert lo(costs, cpu_bytes=1e6, fetch_bytes=50e6, gpu_bytes=1e6, launch_s=30e-6) == ("gpu", "cpu")
    assert lo(costs, cpu_bytes=0, fetch_bytes=0, gpu_bytes=1e6, launch_s=30e-6) == ("gpu", "cpu")
    with pytest.raises(ValueError, match="launch_s=-1"):
        lo(costs, cpu_bytes=0, fetch_bytes=0, gpu_bytes=0, launch_s=-1)
