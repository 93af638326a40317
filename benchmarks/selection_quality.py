"""Selection quality of the library flows on a real model: how much of the true attention mass the
selected pages hold, and where the needle's page ranks.

    python benchmarks/selection_quality.py --model smollm2-135m --context 2048,4096

For each needle-task prompt (`vortex_hybrid.eval.tasks`), the prompt followed by its correct
answer runs once through the model with dense attention (`vortex_hybrid.profile.capture`); at every
full-attention layer the queries of the answer's decode steps (the positions whose next token is an
answer token: the last prompt token, then each answer token but the last) are compared with the
keys before them. Per (layer, KV head, step) and per variant (flow, its `gqa` option, page size,
recent pages) at the runtime's budget (`HybridConfig.budget_for`: ceil(ratio * pages), never
below sink + recent):

- recall: the share of the softmax attention mass (the mean over the KV head's query heads of their
  dense probabilities) that falls on the selected pages; 1.0 means the selection loses nothing;
- needle: for the (layer, head, step) triples where the needle's pages hold >= NEEDLE_MASS of the
  true mass ("retrieval heads"), the share whose selection holds every page of the needle's value,
  and the rank of its worst page among the candidate pages (neither sink nor recent; 0 = first)
  under the variant's scores and under the true mass.

The `mass` row is the ceiling of page selection at that budget: the top pages by true mass (the
same sink and recent pages forced). `dense@L<n` rows give the first n layers every page (Vortex's
`layers_skip`). Writes JSON (--out) and prints the tables last. A measurement, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from vortex_hybrid.config import SUMMARY_DTYPES
from vortex_hybrid.eval import tasks as task_lib
from vortex_hybrid.eval.models import add_model_argument, load_model
from vortex_hybrid.profile import capture
from vortex_hybrid.vflow import load_flow
from vortex_hybrid.predictors.head_properties import (budget_pages, flow_masks, page_mass,
                                                      probe_layout, probe_logits, selection_mask)

NEEDLE_MASS = 0.1
"""A (layer, head, step) counts as retrieving when the needle's pages hold this share of its mass."""
MASS = "mass"
"""The ceiling variant: pages ranked by their true attention mass."""


@dataclass(frozen=True)
class Variant:
    """One selection setting: a flow (name, options), page size, sink and recent pages."""
    flow: str
    options: tuple = ()
    page_size: int = 16
    sink: int = 1
    recent: int = 2
    summary_dtype: str = "float32"

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return (f"{self.flow.rpartition(':')[2]}" + (f"[{opts}]" if opts else "") +
                f" P{self.page_size} s{self.sink} r{self.recent}" +
                ("" if self.summary_dtype == "float32" else f" {self.summary_dtype}"))


LIBRARY = ("oracle", "quest", "centroid", "double_sparsity", "lowbit", "streaming")


def variants(groups: list[str], flows: list[str]) -> list[Variant]:
    """The variants each measurement group adds (see --groups); `flows` for the "flows" group."""
    out: list[Variant] = []
    if "flows" in groups:
        out += [Variant(f) for f in [MASS] + flows]
    if "gqa" in groups:
        out += [Variant(f, (("gqa", g),)) for f in ("quest", "centroid", "double_sparsity")
                for g in ("max", "softmax", "union")]
    if "page" in groups:
        out += [Variant(f, page_size=p) for p in (8, 32) for f in (MASS, "quest", "centroid")]
    if "summary" in groups:              # summaries stored smaller (HybridConfig.summary_dtype)
        out += [Variant(f, summary_dtype=t) for t in SUMMARY_DTYPES for f in ("quest", "centroid", "lowbit")]
    if "recent" in groups:
        out += [Variant(f, recent=r) for r in (1, 4, 8) for f in (MASS, "quest", "centroid")]
    seen: set = set()
    return [v for v in out if not (v in seen or seen.add(v))]


def answer_ids(tok, sample: task_lib.Sample) -> list[int]:
    """Token ids of the answer a correct decode continues the prompt with: " <value>."."""
    return list(tok.encode(" " + sample.answers[0] + ".", add_special_tokens=False))


def value_positions(ids: list[int], tok, value: str) -> list[int]:
    """Positions of the tokens that spell `value` (the asked needle's number, which occurs once in
    a prompt) in `ids`."""
    pieces = [tok.decode(ids[i:i + 1]) for i in range(len(ids))]
    ends = np.cumsum([len(p) for p in pieces])
    at = "".join(pieces).find(value)
    if at < 0:
        raise ValueError(f"value {value!r} not found in the prompt's tokens")
    first = int(np.searchsorted(ends, at, side="right"))
    last = int(np.searchsorted(ends, at + len(value) - 1, side="right"))
    return list(range(first, last + 1))


def question_tokens(ids: list[int], tok, sample: task_lib.Sample, chat: bool) -> int:
    """Tokens after the haystack: the question, the chat template's turn change, the answer's
    prefix (what the `recent` pages would have to cover)."""
    body = sample.prompt_text.rsplit("\n\n", 1)[0]
    other = task_lib.render(replace(sample, prompt_text=body), tok, chat)
    same = next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))
    return len(ids) - same


class Measurer:
    """The per-layer callback of `capture.trace_prompt`: recall and needle ranks of every variant."""

    def __init__(self, vs: list[Variant], ratio: float, needle: list[int], sm_scale: Optional[float]):
        self.vs, self.ratio, self.needle, self.sm_scale = vs, ratio, needle, sm_scale
        self.flows = {v: (None if v.flow == MASS else load_flow(v.flow, **dict(v.options)))
                      for v in vs}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
        q, k = q.float(), k.float()
        m, _, d = q.shape
        hkv = k.shape[1]
        logits = probe_logits(q, k, d ** -0.5 if self.sm_scale is None else self.sm_scale)
        out = {}
        for P in sorted({x.page_size for x in self.vs}):
            k_pool, table, lens, num_pages = probe_layout(k, m, P)
            S = k_pool.shape[0]
            mass = page_mass(logits, hkv, P, S)                             # [m, Hkv, S]
            pages = sorted({t // P for t in self.needle})
            needle_mass = mass[:, :, pages].sum(-1)                         # [m, Hkv]
            idx = torch.arange(S)
            for var in (x for x in self.vs if x.page_size == P):
                n = num_pages[:, None, None]
                forced = (idx < var.sink) | ((idx >= n - var.recent) & (idx < n))   # [m, 1, S]
                if var.flow == MASS:
                    scores = mass
                    mask = selection_mask(mass, num_pages,
                                          budget_pages(self.ratio, num_pages, var.sink, var.recent),
                                          var.sink, var.recent)
                else:
                    (mask,), scores = flow_masks(self.flows[var], q, k_pool, table, lens,
                                                 [self.ratio], num_pages, var.sink, var.recent,
                                                 getattr(torch, var.summary_dtype))
                recall = (mass * mask).sum(-1)                              # [m, Hkv]
                hit = mask[:, :, pages].all(-1)                             # [m, Hkv]
                cand = (idx < n) & ~forced
                in_forced = forced.expand(m, hkv, S)[:, :, pages].all(-1)

                def worst_rank(s):
                    if s is None:
                        return torch.full((m, hkv), -1, dtype=torch.int64)
                    s = torch.where(cand, s.float(), torch.full_like(s.float(), -float("inf")))
                    ranks = torch.stack([(s > s[:, :, p:p + 1]).sum(-1) for p in pages], -1)
                    return ranks.amax(-1)

                out[var] = dict(recall=recall, hit=hit, needle_mass=needle_mass,
                                forced=in_forced, rank=worst_rank(scores), true_rank=worst_rank(mass))
        return out


def run_prompt(model, tok, sample, chat, vs, ratio, n_layers_dense) -> dict:
    """Per variant: arrays over (layer, step, head) of the measured quantities of one prompt."""
    ids = task_lib.render(sample, tok, chat)
    ans = answer_ids(tok, sample)
    needle = value_positions(ids, tok, sample.answers[0])
    meas = Measurer(vs, ratio, needle, None)
    layers = capture.trace_prompt(model, ids + ans[:-1], len(ans), meas)
    res = {}
    for var in vs:
        stack = {key: torch.stack([lay[var][key] for lay in layers]).numpy()   # [L, m, Hkv]
                 for key in layers[0][var]}
        res[var] = stack
        for skip in (n_layers_dense if var == Variant(var.flow) else ()):   # library settings
            # dense in the first `skip` layers
            s = {k: v.copy() for k, v in stack.items()}
            s["recall"][:skip] = 1.0
            s["hit"][:skip] = True
            res[replace(var, options=var.options + (("dense_layers", skip),))] = s
    return dict(prompt_tokens=len(ids), answer_tokens=len(ans), needle_positions=needle,
                tail_tokens=question_tokens(ids, tok, sample, chat), per_variant=res)


def summarize(prompts: list[dict]) -> list[dict]:
    """One row per variant: recall over (prompt, layer, step, head), the needle's hit rate and
    median ranks over the retrieval triples (needle mass >= NEEDLE_MASS, needle not forced)."""
    rows = []
    for var in prompts[0]["per_variant"]:
        rs = [p["per_variant"][var] for p in prompts]
        recall = np.concatenate([r["recall"].ravel() for r in rs])
        per_layer = np.mean([r["recall"].mean((1, 2)) for r in rs], 0)
        ret = [r["needle_mass"] >= NEEDLE_MASS for r in rs]
        sel = [(r_, w & ~r_["forced"]) for r_, w in zip(rs, ret)]
        hit = np.concatenate([r["hit"][w] for r, w in sel])
        rank = np.concatenate([r["rank"][w] for r, w in sel])
        true_rank = np.concatenate([r["true_rank"][w] for r, w in sel])
        hit_layer = [float(np.concatenate([r["hit"][i][w[i]] for r, w in sel]).mean())
                     if sum(int(w[i].sum()) for _, w in sel) else None for i in range(len(per_layer))]
        rows.append(dict(variant=var.label, flow=var.flow, options=dict(var.options),
                         page_size=var.page_size, sink=var.sink, recent=var.recent,
                         recall_mean=float(recall.mean()),
                         recall_p10=float(np.percentile(recall, 10)),
                         recall_per_layer=per_layer.tolist(), needle_hit_per_layer=hit_layer,
                         retrieval_triples_per_layer=[sum(int(w[i].sum()) for _, w in sel)
                                                      for i in range(len(per_layer))],
                         retrieval_triples=int(hit.size),
                         needle_hit=float(hit.mean()) if hit.size else None,
                         needle_rank_median=float(np.median(rank)) if rank.size and rank.min() >= 0
                         else None,
                         true_rank_median=float(np.median(true_rank)) if true_rank.size else None))
    return rows


def table(rows: list[dict], ratio: float) -> str:
    head = ["variant", "recall mean", "recall p10", "needle hit", "needle rank (median)",
            "true rank (median)"]
    lines = [f"budget {ratio:g} of the pages; needle over retrieval (layer, head, step) triples",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        fmt = lambda x, f="{:.3f}": "-" if x is None else f.format(x)
        lines.append(f"| {r['variant']} | {fmt(r['recall_mean'])} | {fmt(r['recall_p10'])} | "
                     f"{fmt(r['needle_hit'], '{:.2f}')} | {fmt(r['needle_rank_median'], '{:.0f}')} |"
                     f" {fmt(r['true_rank_median'], '{:.0f}')} |")
    return "\n".join(lines)


def layer_table(rows: list[dict]) -> str:
    """Per layer, for every flow at its library settings: mean recall, and the needle's hit rate
    over that layer's retrieval triples (their count in the first column)."""
    by = {r["variant"].split(" ")[0]: r for r in rows
          if not r["options"] and r["page_size"] == 16 and r["sink"] == 1 and r["recent"] == 2}
    names = list(by)
    first = by[names[0]]
    lines = ["| layer (retrieval triples) | " + " | ".join(names) + " |",
             "|" + " --- |" * (len(names) + 1)]
    fmt = lambda h: "-" if h is None else f"{h:.2f}"
    for i, count in enumerate(first["retrieval_triples_per_layer"]):
        lines.append(f"| {i} ({count}) | " + " | ".join(
            f"{by[n]['recall_per_layer'][i]:.3f} ({fmt(by[n]['needle_hit_per_layer'][i])})"
            for n in names) + " |")
    return "\n".join(lines)


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(ap)
    ap.add_argument("--context", default="2048", help="comma list of prompt tokens (2048)")
    ap.add_argument("--tasks", default="niah_single,niah_multikey", help="needle tasks")
    ap.add_argument("--samples", type=int, default=4, help="samples per task (depths spread) (4)")
    ap.add_argument("--budget", type=float, default=0.05, help="budget ratio (0.05)")
    ap.add_argument("--flows", default=",".join(LIBRARY),
                    help="flows of the 'flows' group: names or path/to/file.py:name "
                         f"(default {','.join(LIBRARY)})")
    ap.add_argument("--groups", default="flows,gqa,page,recent",
                    help="variant groups: flows, gqa, page, recent, summary (summaries stored "
                         "as bfloat16 / float8_e4m3fn; default: all but summary)")
    ap.add_argument("--dense-layers", default="1,2",
                    help="comma list: also score each variant with its first n layers dense (1,2)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/selection_quality.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    model, tok, path = load_model(args.model, "cpu", capture.PROFILE_ATTN, args.threads)
    chat = bool(getattr(tok, "chat_template", None))         # as the eval does
    vs = variants(args.groups.split(","), [f for f in args.flows.split(",") if f])
    dense = [int(x) for x in args.dense_layers.split(",") if x]
    result = dict(model=args.model, budget=args.budget, date=time.strftime("%Y-%m-%d"),
                  command="python benchmarks/selection_quality.py " + " ".join(argv or sys.argv[1:]),
                  device=f"CPU ({os.cpu_count()} cores)", contexts={})
    tables = []
    for context in (int(c) for c in args.context.split(",")):
        t0 = time.perf_counter()
        suite = task_lib.make_suite(args.tasks.split(","), tok, context, args.samples, args.seed,
                                    chat)
        prompts = []
        for i, sample in enumerate(suite):
            prompts.append(run_prompt(model, tok, sample, chat, vs, args.budget, dense))
            print(f"  {context}: prompt {i + 1}/{len(suite)} ({sample.task}, depth "
                  f"{sample.depth:.2f}) {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows = summarize(prompts)
        result["contexts"][context] = dict(
            rows=rows, prompts=[dict(task=s.task, depth=s.depth, seed=s.seed,
                                     prompt_tokens=p["prompt_tokens"], tail_tokens=p["tail_tokens"])
                                for s, p in zip(suite, prompts)],
            seconds=time.perf_counter() - t0)
        tables.append(f"### {args.model} @ {context} tokens "
                      f"(tokens after the haystack: {[p['tail_tokens'] for p in prompts]})\n" +
                      table(rows, args.budget) + "\n\nrecall (needle hit) per layer\n" + layer_table(rows))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
