"""`python -m vortex_hybrid.profile`: calibrate per-head budgets (and the machine) for a model.

- `capture`: dense forward passes of calibration prompts with each full-attention layer's queries,
  keys and values handed to `predictors.head_properties.measure_layer` as the layer runs;
- `calibrate`: measured properties -> per-head budgets (`predictors.budget_selector`), the head
  predictor fitted and judged on held-out prompts, the uniform baseline, a `Calibration`;
- `machine`: the machine's facts (GPU and host memory; HBM, PCIe and CPU bandwidth alone and
  concurrent);
- `plots`: the budget heatmap and the per-layer reuse chart;
- `__main__`: the command line.
"""
