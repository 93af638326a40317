"""Head-property predictor and granularity-budget selector, installed as `vortex_hybrid.predictors`."""
