"""Where a page-sparse decode first leaves the dense answer: which pages held the true attention
mass at that step, and which of them the flow and the mass oracle chose.

    python benchmarks/needle_divergence.py --model smollm2-135m --context 2048 --flow centroid \
        --budget 0.05

For each needle prompt of the eval's suite (same generator, seed, context and chat template as
`python -m vortex_hybrid.eval`), one dense SDPA prefill, then greedy decodes from it through
`HybridCache` in placement `gpu`: dense (every page), the flow at the budget, and the mass oracle
(`vortex_hybrid.eval.mass_oracle`, the eval's `--flow mass`) at the budget. The sparse decodes run
through a recording selector: in the flow's decode it asks the runtime's `SummaryStore` for the
flow's own selection (what the runtime would attend) and attends that, recording beside it the
oracle's selection and the true page mass of the same step; in the oracle's decode it attends the
oracle's selection.

At the first decode step where the flow's tokens leave the dense ones, per (layer, KV head) whose
needle pages (those holding the asked value's tokens) carry >= NEEDLE_SHARE of the true mass
("retrieval heads"): each needle page's share of the mass, its rank among the pages by mass and
by the flow's score (0 = first; `p44 0.25 #0/17`: page 44, 25% of the head's mass, first by mass,
18th by the flow), and whether the flow (F) and the oracle (O) selected it; the mass the flow's and
the oracle's selections hold (mean over (layer, KV head)); and whether the flow's selection in the
runtime equals a float64 recomputation of the flow from the keys (`vflow.select_pages`' reference
interpreter) in every layer. Prints one block per prompt and writes JSON (--out). A measurement,
not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from selection_quality import value_positions
from vortex_hybrid import vflow
from vortex_hybrid.eval import tasks as task_lib
from vortex_hybrid.eval.mass_oracle import MASS_FLOW, MassOracle
from vortex_hybrid.eval.models import add_model_argument, load_model
from vortex_hybrid.eval.run import greedy, mode_config
from vortex_hybrid.integrations.hf import (ATTN_IMPLEMENTATION, CACHE_ARGUMENT, HybridCache,
                                           model_shape)

NEEDLE_SHARE = 0.1
"""A (layer, KV head) counts as retrieving when the needle's pages hold this share of its mass."""


class Recorder:
    """A `HybridCache` selector that attends the flow's selection (`use="flow"`) or the mass
    oracle's (`use="mass"`) and records, per step and layer, the page mass [Hkv, pages] and both
    selections of batch row 0 (the flow's only under "flow")."""

    def __init__(self, cfg, num_layers: int, use: str) -> None:
        self.cfg, self.use, self.cache = cfg, use, None
        self.oracle = MassOracle(cfg, num_layers)
        self.steps: list[list[dict]] = []
        self.scores = None          # the flow's page scores [Hkv, pages] of the last recompute

    def admit(self, keys: torch.Tensor) -> None:
        self.oracle.admit(keys)

    def recompute(self, layer: int, q: torch.Tensor, k_new: torch.Tensor) -> torch.Tensor:
        """The flow's selection of row 0 recomputed in float64 from the request's keys (the
        runtime's copy, this step's token included) by `vflow.select_pages`' reference
        interpreter: what the stored summaries and fused kernels must give."""
        keys = self.cache.runtime.kv.read(self.cache.rids[0], layer)[0].double()
        keys[-1] = k_new[0].double()       # plan() extended the request; run() writes the slot
        T, hkv, D = keys.shape
        P = self.cfg.page_size
        n = -(-T // P)
        pool = torch.cat([keys, keys.new_zeros(n * P - T, hkv, D)])
        pool = pool.view(n, P, hkv, D).transpose(1, 2).contiguous()
        cfg = self.cfg
        args = (q[:1].double(), pool, torch.arange(n, dtype=torch.int32)[None],
                torch.tensor([T], dtype=torch.int32))
        self.scores = vflow.page_scores(cfg.flow, *args)[0]          # [Hkv, pages]
        return vflow.select_pages(cfg.flow, *args, cfg.budget_for(n), cfg.sink_pages,
                                  cfg.recent_pages)[0]

    def select(self, layer: int, q: torch.Tensor, k_new: torch.Tensor) -> torch.Tensor:
        mass_sel = self.oracle.select(layer, q, k_new)
        mass = self.oracle.last_mass[0]
        flow_sel = None
        same = None
        if self.use == "flow":
            cfg = self.cfg
            flow_sel = self.cache.runtime.store.select_pages(
                layer, q, self.cache.rids, cfg.budget_for(mass.shape[1]), cfg.sink_pages,
                cfg.recent_pages)
            same = bool((flow_sel[0] == self.recompute(layer, q, k_new)).all())
        if layer == 0:
            self.steps.append([])
        self.steps[-1].append(dict(mass=mass, mass_sel=mass_sel[0], same=same,
                                   scores=self.scores if flow_sel is not None else None,
                                   flow_sel=None if flow_sel is None else flow_sel[0]))
        return mass_sel if flow_sel is None else flow_sel


def decode(model, cfg, prefill, first, max_new: int, eos: set, use: str = ""):
    """(tokens, recorder or None) of one greedy decode from the shared prefill."""
    keys, values, mask = prefill
    rec = Recorder(cfg, len(model_shape(model).full_layers), use) if use else None
    cache = HybridCache.for_tokens(model, cfg, 1, mask.shape[1] + max_new, selector=rec)
    if rec is not None:
        rec.cache = cache
    try:
        cache.admit(keys, values, mask)
        rows, _ = greedy(model, cache, first, max_new, eos)
    finally:
        cache.close()
    return rows[0], rec


def at_step(step: list[dict], needle_pages: list[int]) -> dict:
    """What the step's layers say about the needle (module docstring)."""
    heads, flow_mass, oracle_mass = [], [], []
    for layer, rec in enumerate(step):
        mass = rec["mass"]                                       # [Hkv, pages], rows sum to G
        total = mass.sum(1)
        for h in range(mass.shape[0]):
            share = mass[h] / total[h]
            flow = set(rec["flow_sel"][h].tolist()) if rec["flow_sel"] is not None else set()
            oracle = set(rec["mass_sel"][h].tolist())
            flow_mass.append(float(share[[p for p in flow if p >= 0]].sum()))
            oracle_mass.append(float(share[[p for p in oracle if p >= 0]].sum()))
            needle = float(share[needle_pages].sum())
            if needle < NEEDLE_SHARE:
                continue
            order = torch.argsort(share, descending=True).tolist()
            scores = rec["scores"]
            heads.append(dict(layer=layer, head=h, needle_share=needle, pages=[
                dict(page=p, share=float(share[p]), rank=order.index(p), flow=p in flow,
                     oracle=p in oracle,
                     flow_rank=None if scores is None else int((scores[h] > scores[h, p]).sum()))
                for p in needle_pages]))
    same = [rec["same"] for rec in step if rec["same"] is not None]
    return dict(retrieval_heads=heads, flow_mass_mean=sum(flow_mass) / len(flow_mass),
                oracle_mass_mean=sum(oracle_mass) / len(oracle_mass),
                flow_layers_recomputed_equal=sum(same), flow_layers=len(same))


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where a and b differ (len of the shorter if one extends the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def probe(model, tok, sample, chat, flow: str, budget: str, max_new: int, eos: set) -> dict:
    from transformers import DynamicCache
    ids = task_lib.render(sample, tok, chat)
    needle = value_positions(ids, tok, sample.answers[0])
    P = 16
    needle_pages = sorted({t // P for t in needle})
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    with torch.inference_mode():
        model.config._attn_implementation = "sdpa"
        dyn = DynamicCache(config=model.config)
        first = model(x, attention_mask=mask, **{CACHE_ARGUMENT: dyn}).logits[:, -1:].argmax(-1)
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    prefill = ([layer.keys for layer in dyn.layers], [layer.values for layer in dyn.layers], mask)
    dense, _ = decode(model, mode_config("dense", None, None, "float32"), prefill, first,
                      max_new, eos)
    sparse, rec = decode(model, mode_config("gpu", flow, budget, "float32"), prefill, first,
                         max_new, eos, "flow")
    oracle, orec = decode(model, mode_config("gpu", MASS_FLOW, budget, "float32"), prefill, first,
                          max_new, eos, "mass")
    text = lambda t: tok.decode(t, skip_special_tokens=True)
    out = dict(task=sample.task, depth=sample.depth, answers=sample.answers,
               prompt_tokens=len(ids), needle_positions=needle, needle_pages=needle_pages,
               needle_tokens=[tok.decode([ids[t]]) for t in needle],
               dense=text(dense), flow=text(sparse), oracle=text(oracle),
               score=dict(dense=task_lib.score(sample, text(dense)),
                          flow=task_lib.score(sample, text(sparse)),
                          oracle=task_lib.score(sample, text(oracle))))
    i = first_difference(dense, sparse)
    if i < min(len(dense), len(sparse)):           # token i came from decode step i (1-based)
        out["divergence"] = dict(token=i, dense=tok.decode([dense[i]]), flow=tok.decode([sparse[i]]),
                                 prefix=text(dense[:i]), **at_step(rec.steps[i - 1], needle_pages))
    j = first_difference(dense, oracle)
    if j < min(len(dense), len(oracle)):
        out["oracle_divergence"] = dict(token=j, dense=tok.decode([dense[j]]),
                                        oracle=tok.decode([oracle[j]]), prefix=text(dense[:j]),
                                        **at_step(orec.steps[j - 1], needle_pages))
    return out


def page_label(x: dict) -> str:
    """`p44 0.25 #0/17 F O` (module docstring)."""
    flow_rank = "" if x["flow_rank"] is None else f"/{x['flow_rank']}"
    return (f"p{x['page']} {x['share']:.2f} #{x['rank']}{flow_rank}"
            f"{' F' if x['flow'] else ''}{' O' if x['oracle'] else ''}")


def report(r: dict) -> str:
    lines = [f"{r['task']} depth {r['depth']:.2f}: value {r['answers'][0]} at tokens "
             f"{r['needle_positions']} {r['needle_tokens']} on pages {r['needle_pages']}",
             f"  dense {r['dense']!r} | flow {r['flow']!r} | oracle {r['oracle']!r} "
             f"(scores {r['score']['dense']:.2f} / {r['score']['flow']:.2f} / "
             f"{r['score']['oracle']:.2f})"]
    for key, who in (("divergence", "flow"), ("oracle_divergence", "oracle")):
        d = r.get(key)
        if d is None:
            lines.append(f"  {who}: never leaves dense")
            continue
        heads = d["retrieval_heads"]
        lines.append(f"  {who} leaves dense at token {d['token']} (after {d['prefix']!r}): "
                     f"{d[who]!r} for {d['dense']!r}; mass held, mean over (layer, head): flow "
                     f"{d['flow_mass_mean']:.3f}, oracle {d['oracle_mass_mean']:.3f}; "
                     f"{len(heads)} retrieval heads" + (
                         f"; flow's selection = float64 recomputation in {d['flow_layers_recomputed_equal']}"
                         f" of {d['flow_layers']} layers" if d["flow_layers"] else ""))
        for h in heads:
            pages = ", ".join(page_label(x) for x in h["pages"])
            lines.append(f"    layer {h['layer']} head {h['head']}: needle {h['needle_share']:.2f}"
                         f" [{pages}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(ap)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--tasks", default="niah_single,niah_multikey")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--only", default="",
                    help="comma list of the suite's sample indices to probe (default: all)")
    ap.add_argument("--flow", default="centroid")
    ap.add_argument("--budget", default="0.05")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/needle_divergence.json")
    args = ap.parse_args(argv)
    model, tok, _ = load_model(args.model, "cpu", ATTN_IMPLEMENTATION, args.threads)
    chat = bool(getattr(tok, "chat_template", None))
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    gen_eos = gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    eos = {t for t in [tok.eos_token_id, *gen_eos] if isinstance(t, int)}
    suite = task_lib.make_suite(args.tasks.split(","), tok, args.context, args.samples, args.seed,
                                chat)
    t0, results = time.perf_counter(), []
    only = {int(i) for i in args.only.split(",") if i}
    for i, sample in enumerate(suite):
        if only and i not in only:
            continue
        results.append(probe(model, tok, sample, chat, args.flow, args.budget,
                             args.max_new_tokens, eos))
        print(report(results[-1]), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(model=args.model, context=args.context, flow=args.flow, budget=args.budget,
                       date=time.strftime("%Y-%m-%d"), seconds=time.perf_counter() - t0,
                       prompts=results), fh, indent=1)
    print(f"{time.perf_counter() - t0:.0f} s; json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
