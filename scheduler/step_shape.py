"""Step shapes of one layer of a host placement: the task DAG of each, its predicted time, and a
chooser that picks the measured-faster shape.

    "split"     the whole batch is selected on the GPU; each request's uncached host pages are split
                between CPU attention and fetches; the GPU attends device + fetched pages, waits for
                the CPU, merges.
    "subbatch"  the batch is two sub-batches by request: C's host pages are attended by the CPU, G's
                uncached host pages are all fetched and attended on the GPU. C is selected first, so
                the CPU starts while G is selected; only C's rows are merged.

`layer_tasks` builds the DAG from byte counts (x = cpu_bytes, y = fetch_bytes, G = gpu_bytes) with
the `cost_model.predict` charges: both host consumers run (x > 0 and y > 0): the concurrent rates,
else the solo ones; cpu = cpu_call_s + x / rate_cpu, fetch = gpu_launch_s + y / rate_pcie, attend =
gpu_launch_s + G / hbm_bw (overlaps the fetch), attend fetched = gpu_launch_s + y / hbm_bw (after the
fetch), each 0 without bytes; merge = merge_s when x > 0, else 0. select_s, merge_s and handoff_s
(host time from a selection to its pages' placement: sync, partition, cache, host selection copy)
are given. Resources: "gpu" (one stream), "pcie", "cpu" (the worker), "host" (the driving thread).

    split:     select -> handoff -> {cpu, fetch, attend}; attend fetched after fetch and attend;
               merge after cpu and attend fetched
    subbatch:  select C (cpu_first_fraction of select_s) -> handoff C -> cpu;
               select C -> select G (the rest) -> handoff G -> {fetch, attend} -> attend fetched;
               merge after cpu and attend fetched

Each sub-batch pays the whole handoff_s (its host work is mostly per call, not per page).
`predict_layer` is the makespan of `list_scheduler.schedule` over that DAG. `launch_order` is the
runtime's use of the list scheduler: which hand-off (the CPU worker's or the GPU's) the driving
thread makes first each layer, from the last step's bytes. `ShapeChooser` keeps an
exponential moving average of measured seconds per layer for each (situation key, shape) and picks
the lowest once each shape has been measured `explore_steps` times under that key.
"""

from __future__ import annotations

import math

from .cost_model import MachineCosts
from .list_scheduler import Task, schedule

SHAPES = ("split", "subbatch")


def _seconds(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}={v!r} must be a finite number >= 0")
    return float(v)


def layer_tasks(shape: str, costs: MachineCosts, *, select_s: float, cpu_bytes: float,
                fetch_bytes: float, gpu_bytes: float, merge_s: float, handoff_s: float,
                cpu_first_fraction: float = 0.5) -> list[Task]:
    """The task DAG of one layer in `shape` (module docstring). cpu_first_fraction: the share of
    select_s spent selecting sub-batch C ("subbatch" only)."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} must be one of {SHAPES}")
    if not isinstance(costs, MachineCosts):
        raise ValueError(f"costs must be a MachineCosts, got {type(costs).__name__}")
    args = dict(select_s=select_s, cpu_bytes=cpu_bytes, fetch_bytes=fetch_bytes,
                gpu_bytes=gpu_bytes, merge_s=merge_s, handoff_s=handoff_s)
    sel, x, y, g, merge, handoff = (_seconds(k, v) for k, v in args.items())
    f = _seconds("cpu_first_fraction", cpu_first_fraction)
    if f > 1:
        raise ValueError(f"cpu_first_fraction={cpu_first_fraction!r} must be in [0, 1]")
    both = x > 0 and y > 0
    rate_cpu = costs.cpu_attn_bw_concurrent if both else costs.cpu_attn_bw
    rate_pcie = costs.h2d_bw_concurrent if both else costs.h2d_bw
    cpu_s = costs.cpu_call_s + x / rate_cpu if x else 0.0
    fetch_s = costs.gpu_launch_s + y / rate_pcie if y else 0.0
    attend_s = costs.gpu_launch_s + g / costs.hbm_bw if g else 0.0
    fetched_s = costs.gpu_launch_s + y / costs.hbm_bw if y else 0.0
    tail = [Task("attend fetched", "gpu", fetched_s, ("fetch", "attend")),
            Task("merge", "gpu", merge if x else 0.0, ("cpu", "attend fetched"))]
    if shape == "split":
        return [Task("select", "gpu", sel),
                Task("handoff", "host", handoff, ("select",)),
                Task("cpu", "cpu", cpu_s, ("handoff",)),
                Task("fetch", "pcie", fetch_s, ("handoff",)),
                Task("attend", "gpu", attend_s, ("handoff",)), *tail]
    return [Task("select C", "gpu", f * sel),
            Task("handoff C", "host", handoff, ("select C",)),
            Task("cpu", "cpu", cpu_s, ("handoff C",)),
            Task("select G", "gpu", (1 - f) * sel, ("select C",)),
            Task("handoff G", "host", handoff, ("select G",)),
            Task("fetch", "pcie", fetch_s, ("handoff G",)),
            Task("attend", "gpu", attend_s, ("handoff G",)), *tail]


LAUNCHES = ("cpu", "gpu")


def launch_order(costs: MachineCosts, *, cpu_bytes: float, fetch_bytes: float, gpu_bytes: float,
                 launch_s: float) -> tuple[str, str]:
    """Which part of a layer the driving thread hands out first once the selection is made: the
    CPU worker's ("cpu": submit, then the CPU attends) or the GPU's ("gpu": launch the fetch and
    the attention). Both hand-offs take the one host thread (`launch_s` each), so this is the list
    scheduler's choice on the "host" resource: the hand-off heading the longer chain (its bottom
    level: hand-off, then CPU attention, or fetch then attention of the fetched pages, then the
    merge) goes first. Byte counts are a layer's (e.g. the last step's, per layer)."""
    args = dict(cpu_bytes=cpu_bytes, fetch_bytes=fetch_bytes, gpu_bytes=gpu_bytes, launch_s=launch_s)
    x, y, g, launch = (_seconds(k, v) for k, v in args.items())
    both = x > 0 and y > 0
    rate_cpu = costs.cpu_attn_bw_concurrent if both else costs.cpu_attn_bw
    rate_pcie = costs.h2d_bw_concurrent if both else costs.h2d_bw
    tasks = [Task("submit cpu", "host", launch),
             Task("launch gpu", "host", launch),
             Task("cpu", "cpu", costs.cpu_call_s + x / rate_cpu if x else 0.0, ("submit cpu",)),
             Task("fetch", "pcie", y / rate_pcie, ("launch gpu",)),
             Task("attend", "gpu", (g + y) / costs.hbm_bw, ("fetch",)),
             Task("merge", "gpu", 0.0, ("cpu", "attend"))]
    first = schedule(tasks).order[0]
    return ("cpu", "gpu") if first == "submit cpu" else ("gpu", "cpu")


def predict_layer(shape: str, costs: MachineCosts, **kwargs) -> float:
    """Predicted seconds of one layer in `shape`: the makespan of `layer_tasks(shape, costs, ...)`."""
    return schedule(layer_tasks(shape, costs, **kwargs)).makespan_s


class ShapeChooser:
    """Picks a step shape per situation from measured seconds per layer.

    key: any hashable the runtime gives (e.g. (batch bucket, placement)). Each (key, shape) keeps
    n (measurements) and an exponential moving average: the first measurement, then
    ema = alpha * seconds + (1 - alpha) * ema. `choose`: while a shape has fewer than explore_steps
    measurements under key, the least-measured one (ties: the predicted-faster one when predictions
    are given, then the order of `shapes`); after that the lowest ema (same ties)."""

    def __init__(self, shapes=SHAPES, explore_steps: int = 2, alpha: float = 0.3):
        shapes = tuple(shapes)
        if not shapes or len(set(shapes)) != len(shapes) or \
                not all(isinstance(s, str) for s in shapes):
            raise ValueError(f"shapes={shapes!r} must be distinct strings, at least one")
        if isinstance(explore_steps, bool) or not isinstance(explore_steps, int) or explore_steps < 1:
            raise ValueError(f"explore_steps={explore_steps!r} must be an int >= 1")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"alpha={alpha!r} must be in (0, 1]")
        self.shapes, self.explore_steps, self.alpha = shapes, explore_steps, float(alpha)
        self._stats: dict = {}          # key -> shape -> [n, ema]

    def _check(self, key, shape=None) -> None:
        try:
            hash(key)
        except TypeError:
            raise ValueError(f"key={key!r} must be hashable") from None
        if shape is not None and shape not in self.shapes:
            raise ValueError(f"shape={shape!r} must be one of {self.shapes}")

    def choose(self, key, predicted: dict | None = None) -> str:
        """The shape to run next under key; predicted: shape -> predicted seconds (ties only)."""
        self._check(key)
        predicted = dict(predicted or {})
        for s, v in predicted.items():
            self._check(key, s)
            _seconds(f"predicted[{s!r}]", v)
        stats = self._stats.get(key, {})
        n = {s: stats.get(s, [0, None])[0] for s in self.shapes}
        ties = {s: (predicted.get(s, math.inf), i) for i, s in enumerate(self.shapes)}
        if min(n.values()) < self.explore_steps:
            return min(self.shapes, key=lambda s: (n[s], *ties[s]))
        return min(self.shapes, key=lambda s: (stats[s][1], *ties[s]))

    def record(self, key, shape: str, seconds: float) -> None:
        """Add one measurement (seconds per layer) of shape under key."""
        self._check(key, shape)
        x = _seconds("seconds", seconds)
        entry = self._stats.setdefault(key, {}).setdefault(shape, [0, None])
        entry[1] = x if entry[0] == 0 else self.alpha * x + (1 - self.alpha) * entry[1]
        entry[0] += 1

    def summary(self) -> dict:
        """{key: {shape: {"n": measurements, "ema": seconds or None}}} for every key measured."""
        return {key: {s: {"n": stats.get(s, [0, None])[0], "ema": stats.get(s, [0, None])[1]}
                      for s in self.shapes} for key, stats in self._stats.items()}
