"""The `hybrid` placement's step shapes, the order of a layer's hand-offs, and the choice of shape.

`SHAPES` names the two ways `hybrid` shares one step's host-resident selected pages between CPU
attention and fetches into the GPU page cache; `HybridAttention` implements both (docs/runtime.md):

    "split"     page by page: every request's misses go to the copy in order of heads served per
                amortised copy cost until the copy would end after the CPU's remaining work
                (`HybridAttention._hybrid_fetch`); the CPU attends the rest where they are.
    "subbatch"  request by request: the first share of the batch's requests
                (`HybridAttention._cpu_row_share`) leaves its host pages to the CPU and fetches
                nothing; the other requests fetch every miss. The whole batch is selected at once.

In both, a miss the GPU page cache cannot take this step stays with the CPU.

`launch_order` is the runtime's use of the list scheduler: which hand-off (the CPU worker's or the
GPU's) the driving thread makes first each layer of a host placement, from the last step's bytes.
`ShapeChooser` keeps an exponential moving average of measured seconds per layer for each
(situation key, shape) and picks the lowest once each shape has been measured `explore_steps`
times under that key (`step_shape="auto"`).
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


class ShapeChooser:
    """Picks a step shape per situation from measured seconds per layer.

    key: any hashable the runtime gives (e.g. (placement, batch bucket)). Each (key, shape) keeps
    n (measurements) and an exponential moving average: the first measurement, then
    ema = alpha * seconds + (1 - alpha) * ema. `choose`: while a shape has fewer than explore_steps
    measurements under key, the least-measured one (ties: the order of `shapes`); after that the
    lowest ema (same ties)."""

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

    def choose(self, key) -> str:
        """The shape to run next under key."""
        self._check(key)
        stats = self._stats.get(key, {})
        n = {s: stats.get(s, [0, None])[0] for s in self.shapes}
        if min(n.values()) < self.explore_steps:
            return min(self.shapes, key=lambda s: n[s])      # min keeps the first of equals
        return min(self.shapes, key=lambda s: stats[s][1])

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
