"""Granularity-budget selector: per head, the budget that meets an output error target.

Input: each head's measured output-error curve over a ladder of budget ratios
(`head_properties.measure_layer`: ||o_sparse - o_dense|| / ||o_dense|| of the flow's own selection)
and the pages each ratio reads. Output: one ladder index per head such that the **mean** error over
heads is at most `target` with the fewest pages in all -- a multiple-choice knapsack, solved by
Lagrangian relaxation: for a price `lam`, each head independently takes the option minimising
pages + lam * error; bisection finds the smallest price whose choice meets the target, then a
greedy pass gives back pages (the head whose next smaller option costs the least error per page
saved) while the target still holds. With `max_pages` as well, the error is minimised under that
total instead when the target would need more pages.

Granularity: the options are (granularity, ratio) pairs; calibration measures page granularity
(the flow's pages, what every placement runs). `Options` carries a granularity name per option so a
finer one (page then token, which the CPU kernels support) joins the same choice when measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Choice:
    """The selector's decision: `index[h]` into the options per head, with its totals."""
    index: np.ndarray            # int [N]
    mean_error: float
    pages: float                 # mean pages per head (a share of the request's pages)
    met: bool                    # mean_error <= target


def select_budgets(error: np.ndarray, pages: np.ndarray, target: float,
                   max_pages: float | None = None) -> Choice:
    """error float [N, R] (per head and option); pages float [R] or [N, R] (pages each option reads,
    any unit); target: the mean error to meet (> 0); max_pages: optional cap on the mean pages.
    Returns the cheapest choice meeting the target (the one with the least error when even the
    largest options miss it, or when the cap binds)."""
    error = np.asarray(error, dtype=np.float64)
    pages = np.broadcast_to(np.asarray(pages, dtype=np.float64), error.shape)
    if error.ndim != 2 or error.shape[1] == 0 or not np.all(np.isfinite(error)):
        raise ValueError(f"error must be a finite [heads, options] array, got shape {error.shape}")
    if not (isinstance(target, (int, float)) and target > 0 and np.isfinite(target)):
        raise ValueError(f"target={target!r} must be a positive finite error")
    N = error.shape[0]
    rows = np.arange(N)

    def totals(idx):
        return float(error[rows, idx].mean()), float(pages[rows, idx].mean())

    def cost(lam):                   # pages + lam * error, per head, over the options
        return np.argmin(pages + lam * error, axis=1)

    best_err = np.argmin(error + 1e-12 * pages, axis=1)          # least error, fewest pages
    if totals(best_err)[0] > target:
        idx = best_err
    else:
        lo, hi = 0.0, 1.0
        while totals(cost(hi))[0] > target and hi < 1e15:
            hi *= 4
        for _ in range(100):
            mid = (lo + hi) / 2
            if totals(cost(mid))[0] <= target:
                hi = mid
            else:
                lo = mid
        idx = cost(hi)
        if totals(idx)[0] > target:
            idx = best_err
        idx = _give_back(error, pages, idx, target)
        dp = _knapsack(error, pages, target)
        if dp is not None and pages[rows, dp].mean() < pages[rows, idx].mean():
            idx = dp
    if max_pages is not None and totals(idx)[1] > max_pages:
        idx = _under_cap(error, pages, max_pages)
    err, pg = totals(idx)
    return Choice(idx.astype(np.int64), err, pg, err <= target + 1e-12)


def _give_back(error, pages, idx, target):
    """Greedy: move heads to cheaper options while the mean error stays <= target."""
    N = error.shape[0]
    idx = idx.copy()
    rows = np.arange(N)
    budget = target * N - error[rows, idx].sum()                 # error still allowed, summed
    while True:
        cur_e, cur_p = error[rows, idx], pages[rows, idx]
        d_err = error - cur_e[:, None]                           # [N, R]
        d_pg = cur_p[:, None] - pages                            # pages saved
        ok = (d_pg > 0) & (d_err <= budget + 1e-15)
        if not ok.any():
            return idx
        rate = np.where(ok, np.maximum(d_err, 0) / np.where(d_pg > 0, d_pg, 1), np.inf)
        h, j = np.unravel_index(np.argmin(rate), rate.shape)
        budget -= d_err[h, j]
        idx[h] = j


BINS = 2048


def _knapsack(error, pages, target):
    """Fewest pages with summed error <= N * target, errors rounded up to BINS steps (None when
    nothing fits after rounding)."""
    N, R = error.shape
    cap = target * N
    step = cap / BINS
    cost = np.ceil(error / step - 1e-9).astype(np.int64)          # [N, R] bins, rounded up
    INF = np.inf
    best = np.full(BINS + 1, INF)
    best[0] = 0.0
    pick = np.zeros((N, BINS + 1), dtype=np.int16)
    for h in range(N):
        new = np.full(BINS + 1, INF)
        arg = np.zeros(BINS + 1, dtype=np.int16)
        for j in range(R):
            c = cost[h, j]
            if c > BINS:
                continue
            cand = np.full(BINS + 1, INF)
            cand[c:] = best[:BINS + 1 - c] + pages[h, j]
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        best, pick[h] = new, arg
    b = int(np.argmin(best))
    if not np.isfinite(best[b]):
        return None
    idx = np.zeros(N, dtype=np.int64)
    for h in range(N - 1, -1, -1):
        j = int(pick[h, b])
        idx[h] = j
        b -= int(cost[h, j])
    return idx


def _under_cap(error, pages, max_pages):
    """The least mean error whose mean pages stay <= max_pages (Lagrangian on the error)."""
    N = error.shape[0]
    rows = np.arange(N)
    lo, hi = 0.0, 1.0
    pick = lambda mu: np.argmin(error + mu * pages, axis=1)      # noqa: E731
    while pages[rows, pick(hi)].mean() > max_pages and hi < 1e15:
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        if pages[rows, pick(mid)].mean() <= max_pages:
            hi = mid
        else:
            lo = mid
    return pick(hi)


def uniform_for(error: np.ndarray, pages: np.ndarray, target: float) -> int | None:
    """The cheapest single option (same for every head) whose mean error meets `target`: the best
    uniform budget, the baseline per-head budgets are judged against. None if none does."""
    error = np.asarray(error, dtype=np.float64)
    pages = np.broadcast_to(np.asarray(pages, dtype=np.float64), error.shape)
    ok = [j for j in range(error.shape[1]) if error[:, j].mean() <= target]
    return min(ok, key=lambda j: pages[:, j].mean()) if ok else None


__all__ = ["Choice", "select_budgets", "uniform_for"]
