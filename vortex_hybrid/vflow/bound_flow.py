"""`BoundFlow`: a flow's two stages resolved once for (shape, device) into what the runtime calls.

    bound = bind_flow("quest", page_size=16, head_dim=128, group=4, device="cuda")
    bound.cache(k_pool, pages, summaries, rows)                 # the fused kernel, or interpreter
    sel = bound.indexer(q, summaries, table, seq_lens, budget, sink, recent)

Lowerings are found from the traced graphs (`lowering.find_lowering`), never from the flow's name,
so a subclass that changes a stage runs its own program. `bind_flow` caches per (flow object,
shape, device, lower): the structural match runs once, never per call. `check=False` on a call
skips argument validation (the runtime validates once per step); the interpreter path reads its
arguments as given.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .compiler import CompiledFlow
from .flow import Flow
from .interpreter import Keys, run_cache, run_indexer
from . import lowering
from .lowering import device_type, find_lowering
from .registry import load_flow


@dataclass(frozen=True)
class BoundFlow:
    """A flow compiled for one (page_size, head_dim, group) with its kernels for one device type.

    `cache_kernel` / `indexer_kernel` are the registered lowerings, or None where the reference
    interpreter runs that stage.
    """

    flow: Flow
    compiled: CompiledFlow
    device: str
    cache_kernel: Optional[Callable]
    indexer_kernel: Optional[Callable]

    def __repr__(self) -> str:
        name = lambda fn: "interpreter" if fn is None else f"{fn.__module__}.{fn.__name__}"
        c = self.compiled
        return (f"<BoundFlow {self.flow!r} P={c.page_size} D={c.head_dim} G={c.group} on "
                f"{self.device}: cache={name(self.cache_kernel)}, indexer={name(self.indexer_kernel)}>")

    @property
    def summaries(self) -> dict[str, tuple[int, int]]:
        """Summary name -> (r, c) per page and KV head (logical: as the flow computes them)."""
        return self.compiled.summaries

    @property
    def codes(self) -> dict[str, int]:
        """Coded summaries: name -> bits a value, stored packed (`CompiledFlow.codes`)."""
        return self.compiled.codes

    @functools.cached_property
    def takes_budgets(self) -> bool:
        """Whether the indexer kernel takes per-(request, KV head) budgets in one call
        (`budgets=`; the library's lowerings do, `flow_kernels`)."""
        fn = self.indexer_kernel
        return fn is not None and "budgets" in inspect.signature(fn).parameters

    @property
    def reads_keys(self) -> bool:
        """True when the indexer reads page keys (cache["k"]), not only summaries."""
        return "k" in self.compiled.indexer_graph.inputs

    def cache(self, k_pool: torch.Tensor, pages: torch.Tensor, summaries: dict[str, torch.Tensor],
              rows: Optional[torch.Tensor] = None, *, check: bool = True) -> None:
        """Summaries of full physical `pages` (int64 [n]) of k_pool [N, Hkv, P, D], written at
        `rows` (int64 [n], default `pages`) of summaries[name] [R, Hkv, r, c] (coded ones packed:
        `CompiledFlow.stored`)."""
        if not self.compiled.summaries:
            return
        if self.cache_kernel is None:
            run_cache(self.compiled, k_pool, pages, summaries, rows)
        else:
            self.cache_kernel(k_pool, pages, summaries, rows, check=check)

    def indexer(self, q: torch.Tensor, summaries: dict[str, torch.Tensor], page_table: torch.Tensor,
                seq_lens: torch.Tensor, budget: int, sink: int, recent: int, *,
                num_kv_heads: Optional[int] = None, keys: Optional[Keys] = None,
                check: bool = True, budgets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sel int32 [B, Hkv, budget] (-1 padded) from q [B, Hq, D], summaries [R, Hkv, r, c] and
        page_table int32 [B, max_pages] (logical page -> summary row); keys only for flows that read
        page keys. num_kv_heads is needed only by flows without summaries. budgets: int32
        [B, Hkv], each (request, KV head)'s own budget (<= budget): only with an indexer kernel
        that takes them (`takes_budgets`)."""
        if budgets is not None and not self.takes_budgets:
            raise ValueError(f"budgets=: the indexer of {self.flow!r} on {self.device} "
                             f"({'interpreter' if self.indexer_kernel is None else 'its lowering'})"
                             " takes one budget per call; pass budget only")
        if self.indexer_kernel is not None:
            extra = {} if budgets is None else {"budgets": budgets}
            sel = self.indexer_kernel(q, summaries, page_table, seq_lens, budget, sink, recent,
                                      page_size=self.compiled.page_size, check=check, **extra)
            if check and (tuple(sel.shape) != (q.shape[0], sel.shape[1], budget)
                          or sel.dtype != torch.int32):
                raise RuntimeError(f"lowering {self.indexer_kernel!r} returned sel "
                                   f"{tuple(sel.shape)} {sel.dtype}; expected "
                                   f"({q.shape[0]}, Hkv, {budget}) int32")
            return sel
        hkv = num_kv_heads
        if hkv is None:
            some = next(iter(summaries.values()), None)
            hkv = some.shape[1] if some is not None else keys[0].shape[1] if keys else None
        if hkv is None:
            raise ValueError(f"{self.flow!r} has no summaries and reads no keys: pass num_kv_heads")
        return run_indexer(self.compiled, q, summaries, page_table, seq_lens, budget, sink, recent,
                           hkv, keys)


_bound: "weakref.WeakKeyDictionary[Flow, dict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def bind_flow(flow: Union[str, Flow], page_size: int, head_dim: int, group: int,
              device: Union[str, torch.device], *, lower: bool = True) -> BoundFlow:
    """The flow's stages for this shape on `device`'s type ("cpu" or "cuda"), kernels resolved once
    (cached per flow object). lower=False binds the reference interpreter for both stages."""
    flow = load_flow(flow)
    kind = device_type(device)
    key = (page_size, head_dim, group, kind, bool(lower))
    with _LOCK:
        per_flow = _bound.setdefault(flow, {})
        if per_flow.get("generation") != lowering.generation:     # registry changed: rebind
            per_flow.clear()
            per_flow["generation"] = lowering.generation
        if key not in per_flow:
            compiled = flow.compiled(page_size, head_dim, group)
            shape = (page_size, head_dim, group)
            cache_fn = find_lowering(flow, "cache", kind, shape) if lower else None
            index_fn = find_lowering(flow, "indexer", kind, shape) if lower else None
            per_flow[key] = BoundFlow(flow, compiled, kind, cache_fn, index_fn)
        return per_flow[key]
