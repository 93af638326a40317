"""Head-property predictor: the budget a head needs, from statistics a runtime has every step.

Target: per (layer, KV head) and prompt, log2 of the smallest ladder ratio whose output error is at
most the head's error target (`needed_log2`; the largest ratio when none is). Features:
`head_properties.FEATURES` (the flow's page-score statistics and selection reuse, one pass over
scores the indexer computes anyway), plus the layer's depth in [0, 1]. Model: least squares, with a
small ridge term, fitted on calibration prompts; `evaluate` reports its error on held-out prompts
(mean absolute error in log2 units -- 1.0 means off by a factor of two -- and the share of held-out
heads whose predicted budget, rounded up to the ladder, meets the target).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .head_properties import FEATURES

RIDGE = 1e-3


def needed_log2(error: np.ndarray, ladder: np.ndarray, target: float) -> np.ndarray:
    """error [..., R] -> log2 of the smallest ratio with error <= target (else the largest)."""
    ok = np.asarray(error) <= target
    first = np.where(ok.any(-1), ok.argmax(-1), len(ladder) - 1)
    return np.log2(np.asarray(ladder, dtype=np.float64)[first])


def design(features: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """[n, F] features and [n] layer depth -> [n, F + 2] regressors (intercept first)."""
    features = np.asarray(features, dtype=np.float64)
    return np.column_stack([np.ones(len(features)), features, np.asarray(depth, np.float64)])


@dataclass
class HeadPredictor:
    """log2(needed ratio) = design(features, depth) @ coef."""
    coef: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, depth: np.ndarray, target_log2: np.ndarray
            ) -> "HeadPredictor":
        X = design(features, depth)
        y = np.asarray(target_log2, dtype=np.float64)
        if len(y) < X.shape[1]:
            raise ValueError(f"fitting the head predictor needs at least {X.shape[1]} heads, "
                             f"got {len(y)}")
        A = X.T @ X + RIDGE * len(y) * np.diag([0.0] + [1.0] * (X.shape[1] - 1))
        return cls(np.linalg.solve(A, X.T @ y))

    def predict_log2(self, features: np.ndarray, depth: np.ndarray) -> np.ndarray:
        return design(features, depth) @ self.coef

    def evaluate(self, features, depth, error, ladder, target) -> dict:
        """Held-out quality: {"mae_log2", "meets_target", "heads"} (module docstring)."""
        ladder = np.asarray(ladder, dtype=np.float64)
        pred = self.predict_log2(features, depth)
        truth = needed_log2(error, ladder, target)
        j = np.searchsorted(np.log2(ladder), pred - 1e-9).clip(0, len(ladder) - 1)
        meets = np.asarray(error)[np.arange(len(j)), j] <= target
        return {"mae_log2": float(np.abs(pred - truth).mean()), "meets_target": float(meets.mean()),
                "heads": int(len(j))}

    def to_dict(self) -> dict:
        return {"features": list(FEATURES) + ["depth"], "coef": [float(c) for c in self.coef]}

    @classmethod
    def from_dict(cls, d: dict) -> "HeadPredictor":
        coef = np.asarray(d["coef"], dtype=np.float64)
        if coef.shape != (len(FEATURES) + 2,) or not np.all(np.isfinite(coef)):
            raise ValueError(f"predictor coef must be {len(FEATURES) + 2} finite numbers")
        return cls(coef)


__all__ = ["HeadPredictor", "design", "needed_log2"]
