"""Page-scoring rules side by side on a real model's attention: which rules keep the needle's page.

    python benchmarks/scoring_rules.py --model smollm2-135m --context 4096 --samples 20 \
        --prompts 0,3,5,7,9,11,13,16,19,20,22,25,27,29,32,34,37 --traces results/traces

Prompts are the eval's suite (`python -m vortex_hybrid.eval`: same tasks, seed, samples, context,
chat template; `--prompts` picks suite indices). Each prompt plus its correct answer runs once with
dense attention; per full-attention layer the queries of the answer's decode steps and every key
are saved under --traces (float32, ~95 MB per prompt at 4K on smollm2-135m; reused when present),
and so are each prompt's counts (a long run can be split into several, the last one prints all).
Then for every rule, per (prompt, layer, KV head, step) at each budget ratio (the runtime's budget:
ceil(ratio * pages), at least sink + recent; sink 1, recent 2, pages of 16), as
`benchmarks/selection_quality.py` measures:

- hit: over the retrieval triples (the needle's pages hold >= 10% of the true mass), the share whose
  selection holds every needle page; `L7H2`: the same count in layer 7, KV head 2 only (the head
  whose needle centroid loses, docs/BENCHMARKS.md);
- clean: prompts where no retrieval triple of any layer loses a needle page;
- recall: the mean share of the true attention mass on the selected pages;
- rank: the median rank of the needle's worst page among the candidate pages at the first ratio.

Rules (GQA: "sum" adds the group's per-query-head scores, "max" takes the largest): `mass` (the
ceiling), `oracle` (max over tokens of exact q . k), the library flows through `vflow.page_scores`
(`centroid`, `quest`, `double_sparsity`, `lowbit` with its options), and unshipped candidates
computed here: sub-block centroids (`subB`: the page's mean key per block of B tokens, the page
scoring its best block), the page mean plus the keys' per-channel spread
(`cstd`: q . mean + 2 sqrt(sum_d q_d^2 var_d)), Quest's bound on the query's 8 largest channels
and the mean on the others (`qtop8`), the exact product on the query's r largest channels, best
token (`sparqR`, after SparQ, arXiv:2312.04985), and Double Sparsity's 8 channels chosen by
mean |q_d| * mean |k_d| over the same prompt (an optimistic calibration) as a page bound or per
token. A measurement, not a test; prints a markdown table, writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from selection_quality import answer_ids, value_positions
from vortex_hybrid import vflow
from vortex_hybrid.eval import tasks as task_lib
from vortex_hybrid.eval.models import add_model_argument, load_model
from vortex_hybrid.profile import capture

P, SINK, RECENT = 16, 1, 2
NEEDLE_MASS = 0.1
LOWBIT = "lowbit (bits=2, gqa=max)"
TWO_STAGE = [("quest", 4), ("quest", 8), ("quest gqa=max", 4), ("quest gqa=max", 8)]
"""Two-stage rules: the first rule's best c x (the budget's free pages) candidates, re-ranked by
lowbit (what a lowbit indexer that scores only those pages would select)."""
PROBE_HEAD = (7, 2)
"""(layer, KV head) counted separately (`L7H2`)."""


def trace(model, tok, sample, chat) -> dict:
    """q [L, m, Hq, D] of the answer's decode steps and k [L, T, Hkv, D] of one prompt."""
    ids = task_lib.render(sample, tok, chat)
    ans = answer_ids(tok, sample)
    store = []

    def record(q, k, v):
        store.append((q.float().clone(), k.float().clone()))
        return 0

    capture.trace_prompt(model, ids + ans[:-1], len(ans), record)
    return dict(task=sample.task, depth=sample.depth, needle=value_positions(ids, tok,
                                                                            sample.answers[0]),
                q=torch.stack([a for a, _ in store]), k=torch.stack([b for _, b in store]))


def pool_of(k: torch.Tensor, S: int) -> torch.Tensor:
    """[T, H, D] -> [S, H, P, D] (the last page zero-padded)."""
    T, H, D = k.shape
    out = k.new_zeros(S * P, H, D)
    out[:T] = k
    return out.view(S, P, H, D).transpose(1, 2).contiguous()


def flow_scores(flow, q, kp, T) -> torch.Tensor:
    """[m, H, S] page scores of a vflow flow for the m probes (probe i holds T - m + i + 1 keys)."""
    m = q.shape[0]
    S = kp.shape[0]
    table = torch.arange(S, dtype=torch.int32).expand(m, S).contiguous()
    lens = torch.arange(T - m + 1, T + 1, dtype=torch.int32)
    return vflow.page_scores(flow, q, kp, table, lens)


_FLOWS: dict = {}


def library_flows() -> dict:
    """The library flows measured, loaded once: name -> flow object."""
    if not _FLOWS:
        for name, flow, opts in (("centroid", "centroid", {}), ("centroid gqa=max", "centroid", {"gqa": "max"}),
                                 ("quest", "quest", {}), ("quest gqa=max", "quest", {"gqa": "max"}),
                                 ("double_sparsity (8 evenly spaced channels)", "double_sparsity", {}),
                                 ("lowbit (bits=2, gqa=max)", "lowbit", {}),
                                 ("lowbit bits=1", "lowbit", {"bits": 1}),
                                 ("lowbit bits=3", "lowbit", {"bits": 3}),
                                 ("lowbit bits=4", "lowbit", {"bits": 4}),
                                 ("lowbit bits=2 gqa=sum", "lowbit", {"gqa": "sum"})):
            _FLOWS[name] = vflow.load_flow(flow, **opts)
    return _FLOWS


def rules(q, k, kp, T) -> dict:
    """name -> scores [m, H, S] (higher is better)."""
    m, Hq, D = q.shape
    S, H = kp.shape[:2]
    G = Hq // H
    qg = q.view(m, H, G, D)
    out = {name: flow_scores(flow, q, kp, T) for name, flow in library_flows().items()}
    dots = torch.einsum("mhgd,shpd->mhgsp", qg, kp)
    out["oracle (max over tokens and query heads)"] = dots.amax(-1).amax(2)
    out["oracle gqa=sum"] = dots.amax(-1).sum(2)
    mean = kp.mean(2)
    for b in (4, 2):
        sub = kp.reshape(S, H, P // b, b, D).mean(3)
        out[f"sub{b} gqa=max"] = torch.einsum("mhgd,shrd->mhgsr", qg, sub).amax(-1).amax(2)
    cen = torch.einsum("mhgd,shd->mhgs", qg, mean)
    var = (kp - mean[:, :, None]).pow(2).mean(2)
    out["cstd gqa=max"] = (cen + 2 * torch.einsum("mhgd,shd->mhgs", qg ** 2, var).sqrt()).amax(2)
    kmax, kmin = kp.amax(2), kp.amin(2)
    qq = qg[..., None, :]
    bound = torch.maximum(qq * kmax.permute(1, 0, 2)[None, :, None],
                          qq * kmin.permute(1, 0, 2)[None, :, None])          # m h g s d
    absq = qg.abs()
    top8 = (absq >= absq.topk(8, -1).values[..., -1:])[..., None, :]
    out["qtop8 gqa=max"] = torch.where(top8, bound, qq * mean.permute(1, 0, 2)[None, :, None]
                                       ).sum(-1).amax(2)
    for r in (8, 16):
        keep = (absq >= absq.topk(r, -1).values[..., -1:]).float()
        out[f"sparq{r} gqa=max"] = torch.einsum("mhgd,shpd->mhgsp", qg * keep, kp).amax(-1).amax(2)
    weight = absq.mean((0, 2)) * k.abs().mean(0)                            # [H, D]
    chans = torch.zeros(H, D).scatter_(1, weight.topk(8, -1).indices, 1.0)  # [H, D]
    qc = qg * chans[None, :, None]
    qcc = qc[..., None, :]
    out["ds calibrated 8 ch, page bound"] = torch.maximum(
        qcc * kmax.permute(1, 0, 2)[None, :, None], qcc * kmin.permute(1, 0, 2)[None, :, None]
    ).sum(-1).sum(2)
    out["ds calibrated 8 ch, per token gqa=max"] = torch.einsum(
        "mhgd,shpd->mhgsp", qc, kp).amax(-1).amax(2)
    return out


def measure(tr: dict, ratios: list[float], stats: dict) -> None:
    q_all, k_all = tr["q"], tr["k"]
    L, m, Hq, D = q_all.shape
    T, H = k_all.shape[1], k_all.shape[2]
    G = Hq // H
    S = -(-T // P)
    npg = sorted({t // P for t in tr["needle"]})
    lost = {}
    for layer in range(L):
        q, k = q_all[layer], k_all[layer]
        kp = pool_of(k, S)
        pos = torch.arange(T - m, T)
        logits = torch.einsum("mhd,thd->mht", q, k.repeat_interleave(G, 1)) * D ** -0.5
        logits = logits.masked_fill(torch.arange(T)[None, None] > pos[:, None, None], -math.inf)
        probs = torch.softmax(logits, -1).view(m, H, G, T).mean(2)
        mass = probs.new_zeros(m, H, S).index_add_(2, torch.arange(T) // P, probs)
        scores = {"mass (ceiling)": mass}
        scores.update(rules(q, k, kp, T))
        n = (pos + P) // P                                   # pages held by each probe
        idx = torch.arange(S)
        forced = (idx[None] < SINK) | (idx[None] >= n[:, None] - RECENT)
        cand = (idx[None] < n[:, None]) & ~forced                              # [m, S]
        retrieval = mass[:, :, npg].sum(-1) >= NEEDLE_MASS                     # [m, H]
        ranks = {}
        for name, s in scores.items():
            s = torch.where(cand[:, None], s.float(), torch.full_like(s.float(), -math.inf))
            order = torch.sort(s, dim=-1, descending=True, stable=True).indices
            ranks[name] = torch.empty_like(order).scatter_(-1, order,
                                                           torch.arange(S).expand_as(order))
        for first, c in TWO_STAGE:                      # per budget: first's top c x free pages
            for r in ratios:                            # re-ranked by lowbit
                free = (torch.ceil(r * n.double() - 1e-9).long().clamp(min=SINK + RECENT)
                        - SINK - RECENT)[:, None, None]
                keep = (ranks[first] < c * free) & cand[:, None]
                s = torch.where(keep, scores[LOWBIT].float(), -math.inf)
                order = torch.sort(s, dim=-1, descending=True, stable=True).indices
                ranks[(f"{first} top {c}x budget, then lowbit", r)] = torch.empty_like(
                    order).scatter_(-1, order, torch.arange(S).expand_as(order))
        for name, rank_of in ranks.items():
            if isinstance(name, tuple) and name[1] != ratios[0]:
                continue                                # a two-stage rule: one entry a ratio
            for r in ratios:
                rank = rank_of if not isinstance(name, tuple) else ranks[(name[0], r)]
                worst = rank[:, :, npg].amax(-1)                               # [m, H]
                free = (torch.ceil(r * n.double() - 1e-9).long().clamp(min=SINK + RECENT)
                        - SINK - RECENT)[:, None]
                hit = worst < free
                sel = ((rank < free[..., None]) & cand[:, None]) | forced[:, None]
                key = name[0] if isinstance(name, tuple) else name
                st = stats.setdefault(key, {}).setdefault(r, dict(
                    hit=0, triples=0, recall=0.0, n=0, probe_hit=0, probe_triples=0, clean=0,
                    prompts=0, ranks=[]))
                st["hit"] += int(hit[retrieval].sum())
                st["triples"] += int(retrieval.sum())
                st["recall"] += float((mass * sel).sum(-1).sum())
                st["n"] += m * H
                if layer == PROBE_HEAD[0]:
                    w = retrieval[:, PROBE_HEAD[1]]
                    st["probe_hit"] += int(hit[:, PROBE_HEAD[1]][w].sum())
                    st["probe_triples"] += int(w.sum())
                if r == ratios[0]:
                    st["ranks"] += worst[retrieval].tolist()
                lost[(key, r)] = lost.get((key, r), 0) + int((retrieval & ~hit).sum())
    for (name, r), count in lost.items():
        stats[name][r]["clean"] += int(count == 0)
        stats[name][r]["prompts"] += 1


def merge(into: dict, one: dict) -> None:
    """Add one prompt's counts (and needle ranks) to `into`."""
    for name, per in one.items():
        for r, st in per.items():
            acc = into.setdefault(name, {}).setdefault(r, {k: ([] if k == "ranks" else 0)
                                                           for k in st})
            for k, v in st.items():
                acc[k] = acc[k] + v


def table(stats: dict, ratios: list[float]) -> tuple[str, list[dict]]:
    head = ["rule"] + [f"{x} @{r:g}" for r in ratios for x in ("hit", "recall", "L7H2", "clean")]
    lines = ["| " + " | ".join(head + [f"rank @{ratios[0]:g}"]) + " |",
             "|" + " --- |" * (len(head) + 1)]
    rows = []
    for name, per in stats.items():
        row = dict(rule=name)
        cells = [name]
        for r in ratios:
            st = per[r]
            row[str(r)] = dict(needle_hit=st["hit"] / max(1, st["triples"]),
                               recall=st["recall"] / st["n"], retrieval_triples=st["triples"],
                               l7h2_hit=st["probe_hit"], l7h2_triples=st["probe_triples"],
                               clean_prompts=st["clean"], prompts=st["prompts"])
            cells += [f"{row[str(r)]['needle_hit']:.3f}", f"{row[str(r)]['recall']:.3f}",
                      f"{st['probe_hit']}/{st['probe_triples']}", f"{st['clean']}/{st['prompts']}"]
        ranks = sorted(per[ratios[0]]["ranks"])
        row["needle_rank_median"] = ranks[len(ranks) // 2] if ranks else None
        cells.append(str(row["needle_rank_median"]))
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(row)
    return "\n".join(lines), rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(ap)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--tasks", default="niah_single,niah_multikey")
    ap.add_argument("--samples", type=int, default=20, help="samples per task of the suite (20)")
    ap.add_argument("--prompts", default="", help="comma list of suite indices (default: all)")
    ap.add_argument("--budget", default="0.02,0.05", help="comma list of budget ratios")
    ap.add_argument("--traces", default="results/traces", help="folder of saved traces")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/scoring_rules.json")
    args = ap.parse_args(argv)
    ratios = [float(x) for x in args.budget.split(",")]
    model = tok = None
    chat = None
    os.makedirs(args.traces, exist_ok=True)
    stats: dict = {}
    t0 = time.perf_counter()
    model, tok, _ = load_model(args.model, "cpu", capture.PROFILE_ATTN, args.threads)
    chat = bool(getattr(tok, "chat_template", None))
    suite = task_lib.make_suite(args.tasks.split(","), tok, args.context, args.samples, args.seed,
                                chat)
    picks = [int(x) for x in args.prompts.split(",") if x] or list(range(len(suite)))
    for i in picks:
        if not 0 <= i < len(suite):
            raise ValueError(f"--prompts index {i} is outside the suite's 0..{len(suite) - 1}")
        path = os.path.join(args.traces, f"{args.model}_{args.context}_{args.seed}_{i}.pt")
        done = path.removesuffix(".pt") + f"_stats_{args.budget}.json"
        if os.path.exists(done):                  # measured before (this run was split up)
            with open(done) as fh:
                merge(stats, {n: {float(r): v for r, v in per.items()}
                              for n, per in json.load(fh).items()})
        else:
            if not os.path.exists(path):
                torch.save(trace(model, tok, suite[i], chat), path)
            one: dict = {}
            measure(torch.load(path), ratios, one)
            with open(done, "w") as fh:
                json.dump(one, fh)
            merge(stats, one)
        print(f"  prompt {i} ({suite[i].task}, depth {suite[i].depth:.2f}) "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    text, rows = table(stats, ratios)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(model=args.model, context=args.context, prompts=picks, budgets=ratios,
                       date=time.strftime("%Y-%m-%d"), device=f"CPU ({os.cpu_count()} cores)",
                       command="python benchmarks/scoring_rules.py " + " ".join(
                           argv if argv is not None else sys.argv[1:]), rows=rows), fh, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
