"""Head-property predictor and granularity-budget selector, installed as `vortex_hybrid.predictors`.

- `head_properties`: per (layer, KV head) output error vs budget, concentration, locality, reuse,
  and cheap online features, measured on calibration traces;
- `head_predictor`: the budget a head needs, from the cheap features (fitted, held-out error);
- `budget_selector`: per-head budgets meeting a mean output-error target with the fewest pages;
- `calibration`: the versioned JSON file that carries the budgets to the runtime.
"""

from .budget_selector import Choice, select_budgets, uniform_for
from .calibration import Calibration
from .head_predictor import HeadPredictor
from .head_properties import LADDER, LayerProperties, measure_layer

__all__ = ["Calibration", "Choice", "HeadPredictor", "LADDER", "LayerProperties", "measure_layer",
           "select_budgets", "uniform_for"]
