"""Measured head properties -> a `Calibration`, with the evidence for it.

Calibration prompts give each (layer, KV head)'s mean output-error curve over the budget ladder; the
selector (`predictors.budget_selector.select_budgets`) picks per-head budgets whose mean error meets
the target with the fewest pages. Held-out prompts then judge the choice against uniform budgets:
the held-out mean error of the per-head budgets, and the pages a uniform budget needs for that same
held-out error (interpolated between ladder ratios, linear in log pages), so `pages_ratio` = per-head
pages / uniform pages at equal error (below 1: fewer pages). The head predictor is fitted on the
calibration prompts and its error reported on the held-out ones.

Granularity: with `granularity="auto"` each head's options are the ladder at page granularity and
the ladder at token granularity (`head_properties.error_token`, costing `token_cost` of the pages'
bytes); the selector picks among both, pages counted as byte-equivalent pages. The uniform baseline
is page granularity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..predictors.budget_selector import Choice, select_budgets, uniform_for
from ..predictors.calibration import Calibration
from ..predictors.head_predictor import HeadPredictor, needed_log2
from ..predictors.head_properties import TOKEN_SHARE, LayerProperties, token_cost

def stack(traces: list[list[LayerProperties]], name: str) -> np.ndarray:
    """[prompts, layers, ...] of one property."""
    return np.stack([np.stack([getattr(p, name).numpy() for p in layers]) for layers in traces])


@dataclass
class Curves:
    """Mean output-error curves per (layer, KV head) over the budget ladder, at page and at token
    granularity, and the pages each ladder ratio reads (a share of the request's pages)."""
    error: np.ndarray            # [L, H, R]
    error_token: np.ndarray      # [L, H, R]
    pages: np.ndarray            # [R]

    @classmethod
    def of(cls, traces: list[list[LayerProperties]]) -> "Curves":
        return cls(stack(traces, "error").mean(0), stack(traces, "error_token").mean(0),
                   stack(traces, "pages").mean((0, 1)))

    @classmethod
    def stored(cls, cal: Calibration) -> tuple["Curves", Optional["Curves"]]:
        """The calibration-prompt and held-out (None without) curves a profile run stored;
        KeyError if the file has none."""
        E = np.asarray(cal.extra["error_curves"], dtype=np.float64)
        calib = cls(E, np.asarray(cal.extra.get("token_error_curves", E), dtype=np.float64),
                    np.asarray(cal.extra["pages_curve"], dtype=np.float64))
        held = (cal.extra.get("summary") or {}).get("heldout") or {}
        if "error_curves" not in held:
            return calib, None
        Eh = np.asarray(held["error_curves"], dtype=np.float64)
        return calib, cls(Eh, np.asarray(held.get("token_error_curves", Eh), dtype=np.float64),
                          np.asarray(held["uniform_curve"]["pages"], dtype=np.float64))

    def options(self, granularity: str, token_share: float = TOKEN_SHARE
                ) -> tuple[np.ndarray, np.ndarray]:
        """The selector's options per head: (errors [L, H, R or 2R], pages [R or 2R]); page
        options first, then token options (at `token_cost` of the pages' bytes) for "auto"."""
        if granularity == "page":
            return self.error, self.pages
        return (np.concatenate([self.error, self.error_token], -1),
                np.concatenate([self.pages, self.pages * token_cost(token_share)]))


def choose(curves: Curves, granularity: str, target: float, max_pages: float | None = None,
           token_share: float = TOKEN_SHARE) -> tuple[Choice, np.ndarray]:
    """The selector's choice over `curves`' options, and its option index per head [L, H]
    (index // R: granularity, page then token; index % R: the ladder ratio)."""
    E, pages = curves.options(granularity, token_share)
    L, H, _ = E.shape
    choice = select_budgets(E.reshape(L * H, -1), pages, target, max_pages)
    return choice, choice.index.reshape(L, H)


def uniform_pages_at(error_curve: np.ndarray, pages: np.ndarray, target: float) -> float:
    """Pages a uniform budget needs for mean error `target`, from its mean-error curve over the
    ladder (decreasing in pages), interpolated linearly in log pages; the ladder's ends clamp."""
    e = np.minimum.accumulate(error_curve)               # more pages never hurt, as a bound
    if target >= e[0]:
        return float(pages[0])
    if target <= e[-1]:
        return float(pages[-1])
    j = int(np.argmax(e <= target))                      # first ladder step meeting the target
    lo, hi = np.log(pages[j - 1]), np.log(pages[j])
    t = (e[j - 1] - target) / max(e[j - 1] - e[j], 1e-30)
    return float(np.exp(lo + t * (hi - lo)))


def judge_heldout(idx: np.ndarray, held: Curves, granularity: str,
                  token_share: float = TOKEN_SHARE) -> dict:
    """Chosen options `idx` [L, H] on held-out curves: their mean error and pages, and the pages a
    uniform page-granularity budget needs for that error (module docstring)."""
    E, pages = held.options(granularity, token_share)
    err = float(np.take_along_axis(E, idx[:, :, None], 2).mean())
    used = float(pages[idx].mean())
    uniform = uniform_pages_at(held.error.mean((0, 1)), held.pages, err)
    return {"per_head_mean_error": err, "per_head_pages": used,
            "uniform_pages_at_equal_error": uniform, "pages_ratio": used / uniform}


def judge(calib: Curves, held: Curves, target: float, granularity: str,
          max_pages: float | None = None, token_share: float = TOKEN_SHARE) -> dict:
    """Per-head budgets chosen on `calib` for `target`, judged on `held`."""
    choice, idx = choose(calib, granularity, target, max_pages, token_share)
    R = calib.error.shape[-1]
    return {"target": target, "granularity": granularity, "met_on_calibration": choice.met,
            "token_heads": int((idx >= R).sum()),
            **judge_heldout(idx, held, granularity, token_share)}


def calibrate(calib: list[list[LayerProperties]], held: list[list[LayerProperties]],
              ladder: list[float], target: float, max_pages: float | None, settings: dict,
              model: dict, granularity: str = "auto") -> tuple[Calibration, dict]:
    """The calibration and a summary (module docstring). settings: flow, page_size, sink_pages,
    recent_pages; model: name and shape fields; granularity: "page" or "auto"."""
    c = Curves.of(calib)
    L, H, R = c.error.shape
    choice, idx = choose(c, granularity, target, max_pages)
    u = uniform_for(c.error.reshape(L * H, R), c.pages, target)
    summary = {
        "calibration_prompts": len(calib), "heldout_prompts": len(held),
        "per_head": {"mean_error": choice.mean_error, "pages": choice.pages, "met": choice.met,
                     "token_heads": int((idx >= R).sum())},
        "uniform": None if u is None else {"ratio": ladder[u], "pages": float(c.pages[u]),
                                           "mean_error": float(c.error[:, :, u].mean())},
    }
    if held:
        h = Curves.of(held)
        summary["heldout"] = {
            **judge_heldout(idx, h, granularity),
            "uniform_curve": {"ratio": list(ladder), "pages": h.pages.tolist(),
                              "mean_error": h.error.mean((0, 1)).tolist()},
            "error_curves": h.error.tolist(),        # [L, H, R]: other targets judged offline
            "token_error_curves": h.error_token.tolist(),
        }
    predictor, pred_summary = fit_predictor(calib, held, ladder, target)
    summary["predictor"] = pred_summary
    props = {name: stack(calib, name).mean(0).tolist()
             for name in ("concentration", "locality", "reuse")}
    cal = Calibration(
        model=model, flow=settings["flow"], page_size=settings["page_size"],
        sink_pages=settings["sink_pages"], recent_pages=settings["recent_pages"],
        error_target=float(target), budgets=np.asarray(ladder)[idx % R],
        granularity=np.where(idx >= R, "token", "page").tolist(), token_share=TOKEN_SHARE,
        extra={"ladder": list(ladder), "error_curves": c.error.tolist(),
               "pages_curve": c.pages.tolist(), "token_error_curves": c.error_token.tolist(),
               "granularity_choice": granularity, "properties": props,
               "predictor": predictor.to_dict() if predictor else None, "summary": summary})
    return cal, summary


def _rows(traces, ladder, target):
    """Per (prompt, layer, head): features [n, F], depth [n], error curve [n, R]."""
    feats = stack(traces, "features")                    # [N, L, H, F]
    err = stack(traces, "error")                         # [N, L, H, R]
    N, L, H, F = feats.shape
    depth = np.broadcast_to((np.arange(L) / max(L - 1, 1))[None, :, None], (N, L, H))
    return feats.reshape(-1, F), depth.reshape(-1), err.reshape(-1, len(ladder))


def fit_predictor(calib, held, ladder, target):
    """The head predictor fitted on `calib`, with its error on `held` (and on `calib`)."""
    X, d, err = _rows(calib, ladder, target)
    spread = needed_log2(err, ladder, target)
    try:
        pred = HeadPredictor.fit(X, d, spread)
    except ValueError as exc:
        return None, {"fitted": False, "why": str(exc)}
    out = {"fitted": True, "train": pred.evaluate(X, d, err, ladder, target)}
    out["train"]["target_std_log2"] = float(spread.std())
    if held:
        Xh, dh, eh = _rows(held, ladder, target)
        out["heldout"] = pred.evaluate(Xh, dh, eh, ladder, target)
        # the baseline a predictor must beat: every head predicted at the training mean
        const = HeadPredictor(np.r_[spread.mean(), np.zeros(len(pred.coef) - 1)])
        out["heldout_constant_baseline"] = const.evaluate(Xh, dh, eh, ladder, target)
    return pred, out
