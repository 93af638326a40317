"""Reference interpreter: runs a compiled flow's graphs with plain torch ops on any device.

Every value is laid out as `[X, Hkv, *logical_shape]`: X is the physical page (cache stage) or the
request (indexer stage), Hkv the KV head, then the logical axes the flow saw; the page axis of the
indexer has `max_pages` entries. Values carry an optional validity mask of the same rank
(broadcastable): pages a request does not hold, the partial tail page's summaries (it has none yet)
and tokens past `seq_len` are invalid. Reductions, softmax and normalisation skip invalid entries,
products treat them as zero, and `topk` ranks them last (the sink/recent rule covers the tail page).

Precision: float64 when the inputs are float64, float32 otherwise. Coded summaries (`vflow.Codes`)
are packed when written and unpacked to float codes when read (`vortex_hybrid.packed_codes`), so
a flow computes with them as with any summary.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import reference
from ..contracts import pages_of, to_summary_dtype, write_summary_rows
from ..packed_codes import pack_codes, unpack_codes
from .compiler import KEYS, CompiledFlow
from .graph import Graph, Node

Value = tuple[torch.Tensor, Optional[torch.Tensor]]   # (value, validity mask or None)

_BINARY: dict[str, Callable] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "gt": torch.gt, "ge": torch.ge, "lt": torch.lt, "le": torch.le,
}
_UNARY: dict[str, Callable] = {
    "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "relu": torch.relu, "sqrt": torch.sqrt,
}


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rank(node: Node) -> int:
    return len(node.shape) + 2


def _align(t: Optional[torch.Tensor], rank: int) -> Optional[torch.Tensor]:
    """Insert size-1 axes after the two leading axes until `t` has `rank` dims (right alignment)."""
    if t is None:
        return None
    while t.dim() < rank:
        t = t.unsqueeze(2)
    return t


def _and(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    return a if b is None else a & b


def _reduce(op: str, x: torch.Tensor, mask: Optional[torch.Tensor], dims: tuple[int, ...],
            keepdim: bool) -> Value:
    if mask is None:
        if op == "mean":
            return x.mean(dims, keepdim=keepdim), None
        if op == "norm":
            return torch.linalg.vector_norm(x, 2, dims, keepdim=keepdim), None
        fn = {"sum": torch.sum, "max": torch.amax, "min": torch.amin}[op]
        return fn(x, dims, keepdim=keepdim), None
    full = mask.expand_as(x)
    if op in ("sum", "mean", "norm"):
        filled = torch.where(full, x * x if op == "norm" else x, torch.zeros_like(x))
        out = filled.sum(dims, keepdim=keepdim)
        if op == "mean":
            out = out / full.sum(dims, keepdim=keepdim).clamp_min(1).to(x.dtype)
        elif op == "norm":
            out = out.sqrt()
    else:
        fill = float("-inf") if op == "max" else float("inf")
        filled = torch.where(full, x, torch.full_like(x, fill))
        out = (torch.amax if op == "max" else torch.amin)(filled, dims, keepdim=keepdim)
    valid = torch.any(mask, dim=dims, keepdim=keepdim)
    out = torch.where(valid, out, torch.zeros_like(out))
    return out, valid


class _Run:
    """One execution of one graph: node id -> (value, mask)."""

    def __init__(self, graph: Graph, cdt: torch.dtype, device: torch.device,
                 inputs: dict[str, Value], held: Optional[torch.Tensor] = None) -> None:
        self.graph, self.cdt, self.device, self.held = graph, cdt, device, held   # held: [B, 1, S]
        self.env: dict[int, Value] = {}
        self.inputs = inputs

    def value(self, nid: int) -> Value:
        return self.env[nid]

    def run(self, upto: set[int]) -> None:
        for node in self.graph.nodes:
            if node.id in upto and node.dtype != "selection":
                self.env[node.id] = self.eval(node)

    def eval(self, node: Node) -> Value:
        op, a = node.op, node.attrs
        r = _rank(node)
        ins = [self.env[i] for i in node.inputs]
        if op == "input":
            return self.inputs[a["name"]]
        if op == "const":
            v = a["value"].to(self.device, self.cdt)
            return v.reshape((1, 1) + tuple(v.shape)), None
        if op == "fill":
            return torch.full((1, 1) + a["shape"], a["value"], dtype=self.cdt, device=self.device), None
        if op == "page_index":
            idx = torch.arange(self.held.shape[-1], device=self.device, dtype=self.cdt)
            return idx.reshape(1, 1, -1), self.held
        if op in _BINARY:
            (x, mx), (y, my) = ins
            return _BINARY[op](_align(x, r), _align(y, r)), _and(_align(mx, r), _align(my, r))
        if op == "where":
            (c, mc), (x, mx), (y, my) = ins
            out = torch.where(_align(c, r), _align(x, r), _align(y, r))
            return out, _and(_align(mc, r), _and(_align(mx, r), _align(my, r)))
        if op in _UNARY:
            x, m = ins[0]
            return _UNARY[op](x), m
        if op in ("sum", "mean", "max", "min", "norm"):
            x, m = ins[0]
            return _reduce(op, x, m, tuple(2 + d for d in a["dims"]), a["keepdim"])
        if op == "matmul":
            (x, mx), (y, my) = ins
            x, y, mx, my = _align(x, r), _align(y, r), _align(mx, r), _align(my, r)
            if mx is not None:
                x = torch.where(mx, x, torch.zeros_like(x))
                mx = mx.any(-1, keepdim=True)
            if my is not None:
                y = torch.where(my, y, torch.zeros_like(y))
                my = my.any(-2, keepdim=True)
            return torch.matmul(x, y), _and(mx, my)
        if op == "transpose":
            x, m = ins[0]
            d0, d1 = (2 + d for d in a["dims"])
            return x.transpose(d0, d1), None if m is None else m.transpose(d0, d1)
        if op == "take":
            x, m = ins[0]
            d = 2 + a["dim"]
            index = torch.tensor(a["index"], device=self.device, dtype=torch.int64)
            if m is not None and m.shape[d] != 1:
                m = m.index_select(d, index)
            return x.index_select(d, index), m
        if op in ("softmax", "normalize"):
            x, m = ins[0]
            d = 2 + a["dim"]
            full = torch.ones_like(x, dtype=torch.bool) if m is None else m.expand_as(x)
            if op == "softmax":
                z = torch.where(full, x * a["scale"], torch.full_like(x, float("-inf")))
                out = torch.nan_to_num(torch.softmax(z, d), nan=0.0)
            else:
                z = torch.where(full, x, torch.zeros_like(x))
                out = z / torch.linalg.vector_norm(z, 2, d, keepdim=True).clamp_min(1e-30)
            return out, m
        raise NotImplementedError(f"interpreter has no rule for op {op!r}")


def _scores(run: _Run, nid: int, B: int, hkv: int, S: int) -> torch.Tensor:
    """The score node as [B, Hkv, S] with invalid pages and NaN at -inf, finite +inf capped."""
    x, m = run.value(nid)
    if m is not None:
        x = torch.where(m, x, torch.full_like(x, float("-inf")))
    x = x.reshape(x.shape[0], x.shape[1], -1).expand(B, hkv, S)
    big = torch.finfo(x.dtype).max
    return torch.nan_to_num(x, nan=float("-inf"), posinf=big, neginf=float("-inf")).contiguous()


def _selection_parts(graph: Graph, nid: int, weight: float = 1.0) -> list[tuple[int, float]]:
    """Flatten nested topk/union nodes into (score node, share of the free budget) pairs."""
    node = graph.nodes[nid]
    if node.op == "topk":
        return [(node.inputs[0], weight)]
    parts = []
    for child, share in zip(node.inputs, node.attrs["shares"]):
        parts += _selection_parts(graph, child, weight * share)
    return parts


def _needed(graph: Graph, roots: list[int]) -> set[int]:
    seen, todo = set(), list(roots)
    while todo:
        nid = todo.pop()
        if nid not in seen:
            seen.add(nid)
            todo.extend(graph.nodes[nid].inputs)
    return seen


def run_cache(compiled: CompiledFlow, k_pool: torch.Tensor, pages: torch.Tensor,
              summaries: dict[str, torch.Tensor], rows: Optional[torch.Tensor] = None) -> None:
    """Cache stage over full physical `pages` (int64 [n]): writes rows `rows` (default `pages`) of
    each summary.

    k_pool: [N, Hkv, P, D]; summaries[name]: [R, Hkv, r, c] (float64 stores compute in float64,
    others in float32), or packed uint8 [R, Hkv, r, width] for coded ones (`CompiledFlow.stored`).
    """
    graph = compiled.cache_graph
    if not graph.outputs or pages.numel() == 0:
        return
    rows = pages if rows is None else rows
    cdt = compute_dtype(*summaries.values())
    keys = k_pool.index_select(0, pages.to(k_pool.device)).to(cdt)    # [n, Hkv, P, D]
    run = _Run(graph, cdt, k_pool.device, {"keys": (keys, None)})
    run.run(_needed(graph, list(graph.outputs.values())))
    n, hkv = keys.shape[:2]
    for name, nid in graph.outputs.items():
        value, _ = run.value(nid)
        store = summaries[name]
        bits = compiled.codes.get(name)
        value = value.expand(n, hkv, *compiled.summaries[name]).to(store.device)
        value = to_summary_dtype(value, store.dtype) if bits is None else pack_codes(value, bits)
        write_summary_rows(store, rows.to(store.device, torch.int64), value)


Keys = tuple[torch.Tensor, torch.Tensor]
"""(k_pool [N, Hkv, P, D], key_table int32 [B, max_pages]): where flows that read cache["k"] find
each logical page's keys (a table into k_pool, separate from the summary table)."""


def indexer_scores(compiled: CompiledFlow, q: torch.Tensor, summaries: dict[str, torch.Tensor],
                   page_table: torch.Tensor, seq_lens: torch.Tensor, num_kv_heads: int,
                   keys: Optional[Keys] = None) -> list[tuple[torch.Tensor, float]]:
    """Page scores of every `topk` in the indexer: [(scores [B, Hkv, max_pages], share)].

    Scores are float64 for float64 inputs, else float32; pages without a score (past the request's
    pages, the partial tail page of a summary-based flow) and NaN scores are -inf. `share` is the
    fraction of the free budget the topk gets (1.0 without `ops.union`). Arguments as in
    `run_indexer`.
    """
    graph = compiled.indexer_graph
    B, hq, d = q.shape
    hkv, P = num_kv_heads, compiled.page_size
    S = page_table.shape[1]
    cdt = compute_dtype(q, *summaries.values(), *(keys[:1] if keys is not None else ()))
    dev = q.device
    lens = seq_lens.to(dev, torch.int64)
    page_ids = torch.arange(S, device=dev)
    inputs: dict[str, Value] = {"q": (q.to(cdt).reshape(B, hkv, hq // hkv, d), None)}
    for key in graph.inputs:
        if key.startswith("summary:"):
            name = key.split(":", 1)[1]
            store = summaries[name]
            rows = page_table.to(store.device, torch.int64).clamp(0, max(store.shape[0] - 1, 0))
            value = store[rows]
            if name in compiled.codes:
                value = unpack_codes(value, compiled.codes[name], compiled.summaries[name][1])
            value = value.to(dev, cdt).transpose(1, 2)                   # [B, Hkv, S, r, c]
            full = page_ids[None, :] < (lens // P)[:, None]             # pages with a summary
            inputs[key] = (value, full[:, None, :, None, None])
        elif key == KEYS:
            if keys is None:
                raise ValueError(f"flow {compiled.name!r} reads page keys (cache['k']); pass keys=")
            k_pool, key_table = keys
            phys = key_table.to(k_pool.device, torch.int64).clamp(0, max(k_pool.shape[0] - 1, 0))
            value = k_pool[phys].to(dev, cdt).transpose(1, 2)            # [B, Hkv, S, P, D]
            tok = page_ids[:, None] * P + torch.arange(P, device=dev)[None, :]
            inputs[key] = (value, (tok[None] < lens[:, None, None])[:, None, :, :, None])
    parts = _selection_parts(graph, graph.outputs["selection"])
    held = page_ids[None, None, :] < pages_of(lens, P)[:, None, None]   # pages a request holds
    run = _Run(graph, cdt, dev, inputs, held)
    run.run(_needed(graph, [nid for nid, _ in parts]))
    return [(_scores(run, nid, B, hkv, S), share) for nid, share in parts]


def run_indexer(compiled: CompiledFlow, q: torch.Tensor, summaries: dict[str, torch.Tensor],
                page_table: torch.Tensor, seq_lens: torch.Tensor, budget: int, sink: int,
                recent: int, num_kv_heads: int, keys: Optional[Keys] = None) -> torch.Tensor:
    """Indexer stage for every (request, KV head): sel int32 [B, Hkv, budget], -1 padded.

    q [B, Hq, D]; summaries[name] [R, Hkv, r, c]; page_table int32 [B, max_pages]: logical page ->
    summary row (read for full pages only); seq_lens int32 [B]; keys: see `Keys` (only for flows
    that read cache["k"]). Arguments are valid. With `ops.union`, the free budget
    (budget - sink - recent) is split by the shares: each topk in turn adds its quota of best pages
    among those not yet chosen.
    """
    B, hkv = q.shape[0], num_kv_heads
    dev = q.device
    if B == 0 or page_table.shape[1] == 0:                             # no request, or no page
        return torch.full((B, hkv, budget), -1, dtype=torch.int32, device=dev)
    n_pages = pages_of(seq_lens.to(dev), compiled.page_size).to(torch.int32)
    free = budget - sink - recent
    chosen, taken = None, 0.0
    for scores, share in indexer_scores(compiled, q, summaries, page_table, seq_lens, hkv, keys):
        taken += share
        k = sink + recent + min(free, int(round(taken * free, 9)))
        if chosen is not None:                                          # earlier picks stay picked
            rows = torch.arange(B, device=dev)[:, None, None].expand_as(chosen)
            heads = torch.arange(hkv, device=dev)[None, :, None].expand_as(chosen)
            ok = chosen >= 0
            scores[rows[ok], heads[ok], chosen[ok].long()] = float("inf")
        chosen = reference.topk_pages(scores, k, n_pages, sink, recent)
    return chosen                                                       # the last k is `budget`
