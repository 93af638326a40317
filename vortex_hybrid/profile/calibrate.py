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

import numpy as np

from ..predictors.budget_selector import select_budgets, uniform_for
from ..predictors.calibration import Calibration
from ..predictors.head_predictor import HeadPredictor, needed_log2
from ..predictors.head_properties import TOKEN_SHARE, LayerProperties, token_cost

GRANULARITY_CHOICES = ("page", "auto")


def options(E: np.ndarray, Et: np.ndarray, pages: np.ndarray, granularity: str,
            token_share: float = TOKEN_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """The selector's options per head: (errors [L, H, R or 2R], pages [R or 2R]); page options
    first, then token options when `granularity` is "auto"."""
    if granularity == "page":
        return E, pages
    return np.concatenate([E, Et], -1), np.concatenate([pages, pages * token_cost(token_share)])


def stack(traces: list[list[LayerProperties]], name: str) -> np.ndarray:
    """[prompts, layers, ...] of one property."""
    return np.stack([np.stack([getattr(p, name).numpy() for p in layers]) for layers in traces])


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


def judge(E: np.ndarray, pages: np.ndarray, Eh: np.ndarray, ph: np.ndarray, target: float,
          max_pages: float | None = None, uniform: tuple | None = None) -> dict:
    """Per-head budgets chosen on calibration curves E [L, H, options] (pages [options]) for
    `target`, judged on held-out curves Eh (pages ph, same options): their held-out error and
    pages, and the uniform pages at that error (module docstring) from `uniform` = (held-out mean
    error curve, pages) of the page ladder (default: Eh and ph themselves)."""
    L, H, R = E.shape
    choice = select_budgets(E.reshape(L * H, R), pages, target, max_pages)
    idx = choice.index.reshape(L, H)
    err_h = float(np.take_along_axis(Eh, idx[:, :, None], 2).mean())
    pages_h = float(ph[idx].mean())
    u_err, u_pages = uniform if uniform is not None else (Eh.mean((0, 1)), ph)
    uni_pages = uniform_pages_at(u_err, u_pages, err_h)
    return {"target": target, "met_on_calibration": choice.met, "per_head_mean_error": err_h,
            "per_head_pages": pages_h, "uniform_pages_at_equal_error": uni_pages,
            "pages_ratio": pages_h / uni_pages, "index": idx}


def calibrate(calib: list[list[LayerProperties]], held: list[list[LayerProperties]],
              ladder: list[float], target: float, max_pages: float | None, settings: dict,
              model: dict, granularity: str = "auto") -> tuple[Calibration, dict]:
    """The calibration and a summary (module docstring). settings: flow, page_size, sink_pages,
    recent_pages; model: name and shape fields; granularity: "page" or "auto"."""
    E = stack(calib, "error").mean(0)                    # [L, H, R]
    Et = stack(calib, "error_token").mean(0)
    pages = stack(calib, "pages").mean((0, 1))           # [R], a share of the request's pages
    L, H, R = E.shape
    Eo, po = options(E, Et, pages, granularity)
    choice = select_budgets(Eo.reshape(L * H, -1), po, target, max_pages)
    idx = choice.index.reshape(L, H)
    ratios = np.asarray(ladder)[idx % R]
    gran = np.where(idx >= R, "token", "page")
    u = uniform_for(E.reshape(L * H, R), pages, target)
    summary = {
        "calibration_prompts": len(calib), "heldout_prompts": len(held),
        "per_head": {"mean_error": choice.mean_error, "pages": choice.pages, "met": choice.met,
                     "token_heads": int((idx >= R).sum())},
        "uniform": None if u is None else {"ratio": ladder[u], "pages": float(pages[u]),
                                           "mean_error": float(E[:, :, u].mean())},
    }
    if held:
        Eh = stack(held, "error").mean(0)
        Eht = stack(held, "error_token").mean(0)
        ph = stack(held, "pages").mean((0, 1))
        Eho, pho = options(Eh, Eht, ph, granularity)
        j = judge(Eo, po, Eho, pho, target, max_pages, uniform=(Eh.mean((0, 1)), ph))
        summary["heldout"] = {
            "per_head_mean_error": j["per_head_mean_error"], "per_head_pages": j["per_head_pages"],
            "uniform_pages_at_equal_error": j["uniform_pages_at_equal_error"],
            "pages_ratio": j["pages_ratio"],
            "uniform_curve": {"ratio": list(ladder), "pages": ph.tolist(),
                              "mean_error": Eh.mean((0, 1)).tolist()},
            "error_curves": Eh.tolist(),             # [L, H, R]: other targets judged offline
            "token_error_curves": Eht.tolist(),
        }
    predictor, pred_summary = fit_predictor(calib, held, ladder, target)
    summary["predictor"] = pred_summary
    props = {name: stack(calib, name).mean(0).tolist()
             for name in ("concentration", "locality", "reuse")}
    cal = Calibration(
        model=model, flow=settings["flow"], page_size=settings["page_size"],
        sink_pages=settings["sink_pages"], recent_pages=settings["recent_pages"],
        error_target=float(target), budgets=ratios,
        granularity=gran.tolist(), token_share=TOKEN_SHARE,
        extra={"ladder": list(ladder), "error_curves": E.tolist(), "pages_curve": pages.tolist(),
               "token_error_curves": Et.tolist(), "granularity_choice": granularity,
               "properties": props, "predictor": predictor.to_dict() if predictor else None,
               "summary": summary})
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
    try:
        pred = HeadPredictor.fit(X, d, needed_log2(err, ladder, target))
    except ValueError as exc:
        return None, {"fitted": False, "why": str(exc)}
    out = {"fitted": True, "train": pred.evaluate(X, d, err, ladder, target)}
    spread = needed_log2(err, ladder, target)
    out["train"]["target_std_log2"] = float(spread.std())
    if held:
        Xh, dh, eh = _rows(held, ladder, target)
        out["heldout"] = pred.evaluate(Xh, dh, eh, ladder, target)
        # the baseline a predictor must beat: every head predicted at the training mean
        const = HeadPredictor(np.r_[spread.mean(), np.zeros(len(pred.coef) - 1)])
        out["heldout_constant_baseline"] = const.evaluate(Xh, dh, eh, ladder, target)
    return pred, out
