"""Properties of attention heads, measured on calibration traces (one layer of one prompt at a time).

A calibration trace is what dense attention saw in one layer: the keys and values of a prompt of T
tokens and the queries of its last m positions (the positions where decoding starts: the question,
the answer's first tokens). For each KV head this measures, over those m probe queries:

- `error[h, j]`: the **output** error of the flow's selection at budget ratio `ladder[j]`,
  ||o_sparse - o_dense|| / ||o_dense|| per query head of the group, averaged over the group and the
  probes. The selection is exactly the runtime's (`reference.topk_pages` over the flow's page
  scores, sink and recent pages forced, budget = max(sink + recent, ceil(ratio * pages))).
- `pages[j]`: the pages such a selection reads, as a share of the request's pages (the budget
  floor makes small ratios read more than the ratio at short contexts).
- `error_token[h, j]`: the output error at **token granularity** ("page then token", what the CPU
  kernels run: `cpu_kernels.token_selection`): of the same selected pages, the recent pages are
  attended whole and, among the others, only the best `token_share` of their tokens by the
  group's largest scaled score. It reads every candidate key but only the kept values: about
  (1 + token_share) / 2 of the page selection's bytes (`token_cost`).
- `concentration[h]`: the share of the pages that holds 90% of the head's attention mass (the
  group's mean probabilities) -- low for a needle head, high for a diffuse one.
- `locality[h]`: attention mass on the sink and recent pages -- high for a local head.
- `reuse[h]`: of the pages the flow selects (forced pages excluded) at `reuse_ratio`, the share
  selected again by the next probe query: the step-to-step reuse a GPU page cache can exploit.
- `features[h]`: statistics of the flow's page scores that a runtime has every step for free (no
  dense attention): the top score's z-score, the share of pages scoring above mean + 2 std, and
  `reuse` (`FEATURES`). The predictor (`head_predictor`) maps them to the budget a head needs.

Everything here is torch on any device; float32 unless the inputs are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from vortex_hybrid.vflow import page_scores, select_pages
from vortex_hybrid.vflow.flow import Flow

LADDER = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
"""Budget ratios (shares of a request's pages) calibration measures and the selector chooses from."""
MASS = 0.9
"""`concentration`: share of pages holding this much attention mass."""
FEATURES = ("top_z", "outliers", "reuse")


TOKEN_SHARE = 0.25
"""Tokens kept of the candidate pages at token granularity (the CPU's "page then token")."""


def token_cost(token_share: float) -> float:
    """Bytes of a token-granular selection relative to attending its pages: every key, a share of
    the values."""
    return (1.0 + token_share) / 2.0


@dataclass
class LayerProperties:
    """One layer's measured head properties (see the module docstring); tensors on the CPU."""
    error: torch.Tensor          # float64 [Hkv, R]
    error_token: torch.Tensor    # float64 [Hkv, R]
    pages: torch.Tensor          # float64 [R]
    concentration: torch.Tensor  # float64 [Hkv]
    locality: torch.Tensor       # float64 [Hkv]
    reuse: torch.Tensor          # float64 [Hkv]
    features: torch.Tensor       # float64 [Hkv, len(FEATURES)]


def paged(x: torch.Tensor, page_size: int) -> torch.Tensor:
    """[T, Hkv, D] tokens -> [ceil(T / P), Hkv, P, D] pages (the last one zero-padded)."""
    T, hkv, d = x.shape
    n = -(-T // page_size)
    out = x.new_zeros(n * page_size, hkv, d)
    out[:T] = x
    return out.view(n, page_size, hkv, d).transpose(1, 2).contiguous()


def budget_pages(ratio: float, num_pages: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """The runtime's budget (`HybridConfig.budget_for`) per request: int64, like num_pages."""
    want = torch.ceil(ratio * num_pages.to(torch.float64) - 1e-9).to(torch.int64)
    return torch.clamp(want, min=sink + recent)


def selection_mask(scores: torch.Tensor, num_pages: torch.Tensor, budgets: torch.Tensor,
                   sink: int, recent: int) -> torch.Tensor:
    """bool [B, Hkv, S]: the pages `reference.topk_pages(scores, budget_b, ...)` selects, for a
    budget per request, vectorised: forced pages, then candidates in descending score order (ties
    toward the lower page, as torch's stable sort)."""
    B, hkv, S = scores.shape
    idx = torch.arange(S, device=scores.device)
    n = num_pages.to(scores.device, torch.int64)[:, None, None]
    held = idx < n
    forced = held & ((idx < sink) | (idx >= n - recent))
    cand = held & ~forced
    free = (budgets.to(scores.device)[:, None, None] - forced.sum(-1, keepdim=True)).clamp(min=0)
    key = torch.where(cand, scores, torch.full_like(scores, -math.inf))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    is_cand = torch.gather(cand.expand(B, hkv, S), -1, order)
    take = is_cand & (torch.cumsum(is_cand.to(torch.int64), -1) <= free)
    chosen = torch.zeros(B, hkv, S, dtype=torch.bool, device=scores.device).scatter(-1, order, take)
    every = budgets.to(scores.device)[:, None, None] >= n
    return (forced | chosen | (every & held)).expand(B, hkv, S)


def _attend(q, k, v, mask, scale):
    """o [m, Hq, D] of softmax attention over tokens where mask [m, Hq, T] is True."""
    logits = torch.einsum("mhd,thd->mht", q, k) * scale
    logits = logits.masked_fill(~mask, -math.inf)
    return torch.einsum("mht,thd->mhd", torch.softmax(logits, -1), v), logits


def probe_layout(k: torch.Tensor, m: int, page_size: int):
    """The paged view the flows see of the last `m` positions of a prompt with keys k [T, Hkv, D]
    (probe i at position T - m + i attends tokens 0 .. T - m + i, one request per probe):
    (k_pool [S, Hkv, P, D], page_table int32 [m, S], seq_lens int32 [m], num_pages int64 [m])."""
    T = k.shape[0]
    lens = torch.arange(T - m + 1, T + 1, device=k.device, dtype=torch.int32)
    num_pages = (lens.to(torch.int64) + page_size - 1) // page_size
    k_pool = paged(k, page_size)
    S = k_pool.shape[0]
    table = torch.arange(S, dtype=torch.int32, device=k.device).expand(m, S).contiguous()
    return k_pool, table, lens, num_pages


def probe_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[m, Hq, T] scaled scores of the probes q [m, Hq, D] (the last m positions) against the keys
    k [T, Hkv, D] (GQA: query head h reads KV head h // (Hq // Hkv)), -inf past each probe."""
    m, hq, _ = q.shape
    T, hkv, _ = k.shape
    pos = torch.arange(T - m, T, device=q.device)
    causal = torch.arange(T, device=q.device)[None, :] <= pos[:, None]          # [m, T]
    logits = torch.einsum("mhd,thd->mht", q, k.repeat_interleave(hq // hkv, 1)) * scale
    return logits.masked_fill(~causal[:, None, :], -math.inf)


def page_mass(logits: torch.Tensor, num_kv_heads: int, page_size: int,
              num_pages: int) -> torch.Tensor:
    """[m, Hkv, num_pages]: the softmax attention mass of each page, the mean over a KV head's
    query heads of their probabilities (each row sums to 1). logits [m, Hq, T]: scaled scores, -inf
    where a query does not attend; token t lies on page t // page_size."""
    m, hq, T = logits.shape
    probs = torch.softmax(logits, -1).view(m, num_kv_heads, hq // num_kv_heads, T).mean(2)
    tok_page = torch.arange(T, device=logits.device) // page_size
    return probs.new_zeros(m, num_kv_heads, num_pages).index_add_(2, tok_page, probs)


def flow_masks(flow, q, k_pool, table, lens, ladder, num_pages, sink, recent, summary_dtype=None):
    """Selections (bool [m, Hkv, S]) per ladder ratio, and the flow's page scores (None for a flow
    that combines several scores: then each ratio runs the flow's own selection). summary_dtype:
    the summaries' storage dtype (`vflow.page_scores`; not for flows that combine scores)."""
    try:
        scores = page_scores(flow, q, k_pool, table, lens, summary_dtype=summary_dtype)
    except ValueError:                           # ops.union: several scores, select each ratio
        scores = None
    masks = []
    for r in ladder:
        budgets = budget_pages(r, num_pages, sink, recent)
        if scores is not None:
            masks.append(selection_mask(scores, num_pages, budgets, sink, recent))
            continue
        S = k_pool.shape[0]
        mask = torch.zeros(q.shape[0], k_pool.shape[1], S, dtype=torch.bool, device=q.device)
        for b in range(q.shape[0]):             # one budget per call
            sel = select_pages(flow, q[b:b + 1], k_pool, table[b:b + 1], lens[b:b + 1],
                               int(budgets[b]), sink, recent)[0].long()
            mask[b].scatter_(-1, sel.clamp(min=0), sel >= 0)
        masks.append(mask)
    return masks, scores


def measure_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flow: Union[str, Flow],
                  page_size: int, sink: int, recent: int, ladder: Sequence[float] = LADDER,
                  reuse_ratio: float = 0.05, sm_scale: float | None = None,
                  token_share: float = TOKEN_SHARE) -> LayerProperties:
    """Head properties of one layer (module docstring). q [m, Hq, D]: the queries of the prompt's
    last m positions, in order; k, v [T, Hkv, D]: the prompt's keys and values (after RoPE, as a
    KV cache holds them). Probe i is position T - m + i and attends tokens 0 .. T - m + i."""
    m, hq, d = q.shape
    T, hkv, _ = k.shape
    if m < 1 or T < m or hq % hkv or k.shape != v.shape or k.shape[2] != d:
        raise ValueError(f"measure_layer: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)} are not [m, Hq, D], [T, Hkv, D] with T >= m >= 1")
    g = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    k_pool, table, lens, num_pages = probe_layout(k, m, page_size)
    S = k_pool.shape[0]
    causal = torch.arange(T, device=q.device)[None, :] < lens[:, None]          # [m, T]
    k_rep, v_rep = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)         # [T, Hq, D]
    logits = probe_logits(q, k, scale)
    o_dense = torch.einsum("mht,thd->mhd", torch.softmax(logits, -1), v_rep)
    norm = o_dense.norm(dim=-1).clamp_min(1e-30)

    ladder = list(ladder)
    masks, scores = flow_masks(flow, q, k_pool, table, lens, ladder + [reuse_ratio], num_pages,
                                sink, recent)
    error = torch.zeros(hkv, len(ladder), dtype=torch.float64)
    error_token = torch.zeros(hkv, len(ladder), dtype=torch.float64)
    pages = torch.zeros(len(ladder), dtype=torch.float64)
    tok_page = torch.arange(T, device=q.device) // page_size
    recent_tok = tok_page[None, :] >= (num_pages[:, None] - recent)                # [m, T]
    group_best = logits.view(m, hkv, g, T).amax(2)                              # [m, Hkv, T]

    def err_of(tok):
        o, _ = _attend(q, k_rep, v_rep, tok.repeat_interleave(g, 1), scale)
        err = (o - o_dense).norm(dim=-1) / norm                                 # [m, Hq]
        return err.view(m, hkv, g).mean(dim=(0, 2)).double().cpu()

    for j, mask in enumerate(masks[:len(ladder)]):
        tok = mask[:, :, tok_page] & causal[:, None, :]                         # [m, Hkv, T]
        error[:, j] = err_of(tok)
        pages[j] = (mask[:, 0].sum(-1).double() / num_pages.double()).mean().cpu()
        cand = tok & ~recent_tok[:, None, :]
        keep = torch.ceil(token_share * cand.sum(-1, keepdim=True).double()).long()
        key = torch.where(cand, group_best, torch.full_like(group_best, -math.inf))
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(
            T, device=q.device).expand_as(order))
        error_token[:, j] = err_of((cand & (rank < keep)) | (tok & recent_tok[:, None, :]))

    mass = page_mass(logits, hkv, page_size, S)                                # [m, Hkv, S]
    srt = torch.sort(mass, -1, descending=True).values.cumsum(-1)
    need = (srt < MASS).sum(-1) + 1                                            # pages for MASS
    concentration = (need.double() / num_pages.double()[:, None]).mean(0)
    idx = torch.arange(S, device=q.device)
    n = num_pages[:, None, None]
    forced = (idx < sink) | ((idx >= n - recent) & (idx < n))
    locality = (mass * forced).sum(-1).double().mean(0)

    ref = masks[-1] & ~forced                                                  # [m, Hkv, S]
    reuse = torch.ones(hkv, dtype=torch.float64, device=q.device)  # nothing to compare: all kept
    if m > 1:
        kept = (ref[1:] & ref[:-1]).sum(-1).double()
        total = ref[1:].sum(-1).double()
        reuse = torch.where(total.sum(0) > 0, (kept / total.clamp_min(1)).mean(0), reuse)

    feats = torch.zeros(hkv, len(FEATURES), dtype=torch.float64)
    if scores is not None:
        feats[:, :2] = score_statistics(scores, num_pages, sink, recent).double().mean(0).cpu()
    feats[:, 2] = reuse.cpu()
    return LayerProperties(error, error_token, pages, concentration.cpu(), locality.cpu(),
                           reuse.cpu(), feats)


def score_statistics(scores: torch.Tensor, num_pages: torch.Tensor, sink: int, recent: int
                     ) -> torch.Tensor:
    """float32 [B, Hkv, 2]: per row, the top candidate score's z-score and the share of candidates
    scoring above mean + 2 std (candidates: pages neither sink nor recent, with a finite score).
    A few passes over the scores on their device: what a runtime can afford every step
    (`benchmarks/head_features.py` times it for every head of an 8B model)."""
    S = scores.shape[-1]
    idx = torch.arange(S, device=scores.device)
    n = num_pages.to(scores.device, torch.int64)[:, None, None]
    cand = (idx >= sink) & (idx < n - recent) & torch.isfinite(scores)
    x = torch.where(cand, scores, torch.zeros_like(scores)).float()
    cnt = cand.sum(-1).float().clamp_min(1)
    mean = x.sum(-1) / cnt
    var = ((x - mean[..., None]) ** 2 * cand).sum(-1) / cnt
    std = var.sqrt().clamp_min(1e-12)
    top = torch.where(cand, x, torch.full_like(x, -math.inf)).amax(-1)
    top_z = torch.where(cand.any(-1), (top - mean) / std, torch.zeros_like(mean))
    outliers = ((x > (mean + 2 * std)[..., None]) & cand).sum(-1).float() / cnt
    return torch.stack([top_z, outliers], -1)


def selection_reuse(prev: torch.Tensor, sel: torch.Tensor, num_pages: int) -> torch.Tensor:
    """float32 [B, Hkv]: the share of `sel`'s pages (int [B, Hkv, K], -1 padded) also in `prev`
    (the last step's selection): one scatter and one gather on the device."""
    B, H, _ = sel.shape
    seen = torch.zeros(B, H, num_pages + 1, dtype=torch.bool, device=sel.device)
    seen.scatter_(-1, torch.where(prev >= 0, prev, num_pages).long(), True)
    seen[..., num_pages] = False
    valid = sel >= 0
    hit = torch.gather(seen, -1, torch.where(valid, sel, num_pages).long()) & valid
    return hit.sum(-1).float() / valid.sum(-1).clamp_min(1).float()


__all__ = ["FEATURES", "LADDER", "TOKEN_SHARE", "token_cost", "LayerProperties", "budget_pages",
           "flow_masks", "measure_layer", "page_mass", "paged", "probe_layout", "probe_logits", "score_statistics",
           "selection_mask", "selection_reuse"]
