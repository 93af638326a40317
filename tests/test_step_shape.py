"""Step shapes: the shape chooser's exploration, exploitation, moving average and input checks;
the launch order of a layer's hand-offs."""

from __future__ import annotations

import math

import pytest

from vortex_hybrid.scheduler import step_shape as ss
from vortex_hybrid.scheduler.cost_model import DEFAULTS

ShapeChooser = ss.ShapeChooser


# ---- chooser ---------------------------------------------------------------------------------------
def explore(chooser, key, seconds=None):
    """The shapes chosen while exploring, each recorded with seconds[shape] (default 1.0)."""
    out = []
    for _ in range(len(chooser.shapes) * chooser.explore_steps):
        s = chooser.choose(key)
        out.append(s)
        chooser.record(key, s, (seconds or {}).get(s, 1.0))
    return out


def test_exploration_takes_the_least_measured_shape_in_order():
    assert explore(ShapeChooser(), "k") == ["split", "subbatch", "split", "subbatch"]
    assert explore(ShapeChooser(), "k", {"split": 2.0, "subbatch": 1.0}) == \
        ["split", "subbatch", "split", "subbatch"]            # measured times do not reorder it
    assert explore(ShapeChooser(("subbatch", "split"), explore_steps=1), "k") == ["subbatch", "split"]


def test_exploitation_follows_measurements():
    ch = ShapeChooser()
    explore(ch, (8, "hybrid"), seconds={"split": 1e-3, "subbatch": 2e-3})
    assert ch.choose((8, "hybrid")) == "split"
    ch.record((16, "hybrid"), "split", 1e-3)
    assert ch.choose((16, "hybrid")) == "subbatch"       # a new key explores again
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
