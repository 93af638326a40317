"""lm-evaluation-harness model `vortex_hybrid`: Hugging Face models whose generation decodes through
`HybridAttention`.

    python -m vortex_hybrid.integrations.lm_eval run --model vortex_hybrid \\
        --model_args pretrained=smollm2-135m,placement=hybrid,flow=centroid,budget=0.05 \\
        --tasks vh_passkey --include_path DIR

(this module registers the model, then runs lm-eval's own command line; `python -m
vortex_hybrid.eval.lm_eval_task --out DIR` writes the local task `vh_passkey` used above).

`pretrained` is anything `eval.models.resolve_model` takes: a local folder or a built-in name. The
command line replaces a built-in name in `--model_args` by its converted local folder before
lm-eval reads it (`resolve_builtin_names`): lm-eval hands the model arguments to the tasks too, and
tasks that size their prompts with the model's tokenizer (RULER's) load it from `pretrained`, which
must then be a folder, not a name for the Hugging Face hub. From Python, pass the folder
(`resolve_model(name)`) in `model_args` for the same reason.
Generation (`generate_until` tasks) prefills densely and decodes with hybrid sparse attention, one
`HybridCache` per batch sized from the batch's prompt and generation lengths. Scoring requests
(`loglikelihood`) run the model's SDPA attention: they have no decode step. Options besides
lm-eval's own: placement, flow, budget (a fraction of a request's pages, e.g. 0.05, or tokens per
KV head, e.g. 512t: `config.budget_fields`), gpu_cache_share (slots as a share of the batch's
pages, for offload and hybrid).
"""

from __future__ import annotations

import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..config import HybridConfig, budget_fields
from ..eval.models import MODELS, resolve_model
from .hf import ATTN_IMPLEMENTATION, CACHE_ARGUMENT, HybridCache


@register_model("vortex_hybrid")
class VortexHybridLM(HFLM):
    """HFLM whose generation runs through a `HybridCache` (module docstring)."""

    def __init__(self, pretrained: str, placement: str = "hybrid", flow: str = "centroid",
                 budget: str | float = "0.05", gpu_cache_share: float = 0.25, **kwargs) -> None:
        self.vh = dict(placement=str(placement), flow=str(flow), **budget_fields(budget))
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
            return super()._model_generate(context, max_length, stop,
                                           **{CACHE_ARGUMENT: cache}, **generation_kwargs)
        finally:
            self.model.config._attn_implementation = "sdpa"
            self.generated_steps += cache.stats()["totals"].get("steps", 0)
            cache.close()


MODEL_ARGS = ("--model_args", "-a")


def _resolve_pairs(text: str) -> str:
    """"k=v,k2=v2" with a built-in model name as `pretrained` replaced by its local folder."""
    pairs = []
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == "pretrained" and value.strip() in MODELS:
            pair = f"{key}={resolve_model(value.strip())}"
        pairs.append(pair)
    return ",".join(pairs)


def resolve_builtin_names(argv: list[str]) -> list[str]:
    """lm-eval's arguments with `pretrained=<built-in model>` in `--model_args` / `-a` (as
    "k=v,k2=v2" words, one or several, or `--model_args=...`) replaced by the model's converted
    local folder (`eval.models.resolve_model`, which converts it on first use); the rest as given."""
    out, in_model_args = [], False
    for word in argv:
        flag, sep, value = word.partition("=")
        if sep and flag in MODEL_ARGS:
            out.append(f"{flag}={_resolve_pairs(value)}")
            in_model_args = False
        elif word in MODEL_ARGS:
            out.append(word)
            in_model_args = True
        elif word.startswith("-"):
            out.append(word)
            in_model_args = False
        else:
            out.append(_resolve_pairs(word) if in_model_args else word)
    return out


def main(argv=None) -> None:
    """lm-eval's command line with the `vortex_hybrid` model registered and built-in model names
    resolved to their folders (`resolve_builtin_names`)."""
    from lm_eval.__main__ import cli_evaluate
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        sys.argv = [sys.argv[0], *resolve_builtin_names(argv)]
    except ValueError as exc:            # a built-in model that cannot be fetched or converted
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    cli_evaluate()


if __name__ == "__main__":
    main()
