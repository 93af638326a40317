"""A float64 reference for transformers models that decode through the hybrid runtime (test-only).

`sparse_reference(model, cfg)` gives the attention implementation name `vh_sparse_reference` to
`model` (run it in float64): prefill attends densely (transformers' SDPA, its mask included), and
each decode step of a full-attention layer attends exactly the pages `cfg.flow` selects, computed
independently of the runtime: the row's real tokens (left padding dropped, from the mask) cut
into pages of `cfg.page_size` in order, `vflow.select_pages` over them (its reference interpreter in
float64, budget `cfg.budget_for(pages)`, cfg's sink and recent pages), then
`reference.sparse_decode_attention` in float64. Sliding-window layers attend their window densely,
as the runtime's integration does. `dense=True` attends every page (the same path, no selection).
`select=fn` chooses the pages instead of the flow: fn(q [Hq, D], k [T, Hkv, D]) -> sel [Hkv, K]
(float64 inputs; logical pages, -1 padded).

    with sparse_reference(ref64, cfg):
        logits = ref64(ids, past_key_values=transformers.DynamicCache(config=ref64.config)).logits
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vortex_hybrid import HybridConfig, reference, vflow

REFERENCE = "vh_sparse_reference"


def paged(x: torch.Tensor, P: int) -> torch.Tensor:
    """x [T, Hkv, D] -> pool [ceil(T / P), Hkv, P, D], the last page zero-padded."""
    T, hkv, D = x.shape
    n = -(-T // P)
    x = torch.cat([x, x.new_zeros(n * P - T, hkv, D)])
    return x.reshape(n, P, hkv, D).transpose(1, 2).contiguous()


def selected_attention(cfg: HybridConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       dense: bool = False, sm_scale=None, select=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (o [Hq, D], sel [Hkv, budget]) of one query q [Hq, D] over the pages the flow selects
    from k, v [T, Hkv, D] (token t in page t // page_size); dense: every page; select: the pages
    select(q, k) chooses (float64 inputs)."""
    P = cfg.page_size
    kp, vp = paged(k.double(), P), paged(v.double(), P)
    n = kp.shape[0]
    table = torch.arange(n, dtype=torch.int32, device=k.device)[None]
    lens = torch.tensor([k.shape[0]], dtype=torch.int32, device=k.device)
    q64 = q.double()[None]
    if dense:
        sel = reference.all_pages_sel(lens, kp.shape[1], n, P)
    elif select is not None:
        sel = torch.as_tensor(select(q64[0], k.double()), dtype=torch.int32)[None]
    else:
        sel = vflow.select_pages(cfg.flow, q64, kp, table, lens, cfg.budget_for(n), cfg.sink_pages,
                                 cfg.recent_pages, summary_dtype=getattr(torch, cfg.summary_dtype))
    o, _ = reference.sparse_decode_attention(q64, kp, vp, table, lens, sel, sm_scale)
    return o[0], sel[0]


def _real_tokens(attention_mask, b: int, T: int) -> torch.Tensor:
    """Key positions row b's decode query attends (every position without a mask)."""
    if attention_mask is None:
        return torch.arange(T)
    m = attention_mask[b, 0, -1, -T:]
    keep = m if m.dtype == torch.bool else m == 0
    return keep.nonzero().flatten().cpu()


def reference_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: query [B, Hq, q, D], key/value [B, Hkv, kv, D]."""
    spec = getattr(module, "vh_reference", None)
    if spec is None:
        raise ValueError(f"attn_implementation={REFERENCE!r} outside `sparse_reference`")
    cfg, dense, log, select = spec
    if query.shape[2] > 1 or getattr(module, "is_sliding", False) or \
            getattr(module, "sliding_window", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    B, hq, _, D = query.shape
    out = query.new_zeros(B, 1, hq, D)
    for b in range(B):
        pos = _real_tokens(attention_mask, b, key.shape[2]).to(key.device)
        k = key[b].index_select(1, pos).transpose(0, 1)             # [T, Hkv, D]
        v = value[b].index_select(1, pos).transpose(0, 1)
        o, sel = selected_attention(cfg, query[b, :, 0], k, v, dense, module.scaling, select)
        out[b, 0] = o.to(out.dtype)
        log.append((module.layer_idx, b, sel))
    return out, None


AttentionInterface.register(REFERENCE, reference_attention_forward)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


@contextlib.contextmanager
def sparse_reference(model, cfg: HybridConfig, dense: bool = False, select=None):
    """Within the block `model` attends with `vh_sparse_reference` (module docstring); yields the
    list of (layer, row, sel) its decode steps selected."""
    log: list = []
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    old = model.config._attn_implementation
    for m in mods:
        m.vh_reference = (cfg, dense, log, select)
    model.config._attn_implementation = REFERENCE
    try:
        yield log
    finally:
        model.config._attn_implementation = old
        for m in mods:
            del m.vh_reference
