"""lm-evaluation-harness model `vortex_hybrid`: Hugging Face models whose generation decodes through
`HybridAttention`.

    python -m vortex_hybrid.integrations.lm_eval run --model vortex_hybrid \\
        --model_args pretrained=smollm2-135m,placement=hybrid,flow=centroid,budget=0.05 \\
        --tasks vh_passkey --include_path DIR

(this module registers the model, then runs lm-eval's own command line; `python -m
vortex_hybrid.eval.lm_eval_task --out DIR` writes the local task `vh_passkey` used above).

`pretrained` is anything `eval.models.resolve_model` takes: a local folder or a built-in name.
Generation (`generate_until` tasks) prefills densely and decodes with hybrid sparse attention, one
`HybridCache` per batch sized from the batch's prompt and generation lengths. Scoring requests
(`loglikelihood`) run the model's SDPA attention: they have no decode step. Options besides
lm-eval's own: placement, flow, budget (fraction of a request's pages), gpu_cache_share (slots as a
share of the batch's pages, for offload and hybrid).
"""

from __future__ import annotations

import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..config import HybridConfig
from ..eval.models import resolve_model
from .hf import ATTN_IMPLEMENTATION, HybridCache


@register_model("vortex_hybrid")
class VortexHybridLM(HFLM):
    """HFLM whose generation runs through a `HybridCache` (module docstring)."""

    def __init__(self, pretrained: str, placement: str = "hybrid", flow: str = "centroid",
                 budget: float = 0.05, gpu_cache_share: float = 0.25, **kwargs) -> None:
        self.vh = dict(placement=str(placement), flow=str(flow), budget_ratio=float(budget))
        HybridConfig(**self.vh)                     # bad options fail here, with their names
        self.gpu_cache_share = float(gpu_cache_share)
        super().__init__(pretrained=str(resolve_model(str(pretrained))),
                         attn_implementation="sdpa", **kwargs)
        self.generated_steps = 0
        """Decode steps run through HybridAttention so far (for tests and logs)."""

    def _model_generate(self, context, max_length: int, stop, **generation_kwargs):
        cfg = HybridConfig(**self.vh, kv_dtype=str(self.model.dtype).removeprefix("torch."))
        cache = HybridCache.for_tokens(self.model, cfg, context.shape[0], int(max_length),
                                       cache_share=self.gpu_cache_share)
        self.model.config._attn_implementation = ATTN_IMPLEMENTATION
        try:
            return super()._model_generate(context, max_length, stop, past_key_values=cache,
                                           **generation_kwargs)
        finally:
            self.model.config._attn_implementation = "sdpa"
            self.generated_steps += cache.stats()["totals"].get("steps", 0)
            cache.close()


def main(argv=None) -> None:
    """lm-eval's command line with the `vortex_hybrid` model registered."""
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
