"""`MassOracle`: the eval's ceiling of page selection (`--flow mass`), a diagnostic, not a flow.

Per decode step and per (layer, request, KV head) it selects the pages that hold the most true
attention mass of that step's queries: the softmax over every key of the request (the new token's
included) of each query head, scaled by head_dim ** -0.5 as the runtime's attention, summed over
the KV head's query heads (GQA) and by page. The selection rule is the flows' (`select_pages`,
`reference.topk_pages`): the first `sink_pages` and last `recent_pages` pages forced, the
best-scoring other pages up to `HybridConfig.budget_for(pages)` in all (ties to the lower page),
every page when the request holds no more than the budget, -1 padded. The runtime attends exactly
these pages through its given-selection path (`HybridAttention.run(..., sel=...)`), so against a
flow at the same budget only the choice of pages differs.

It reads every key at every step (it keeps its own float copy of each request's keys per layer):
a measurement of what page-sparse decoding can reach at a budget, never a serving flow. Computed
in float64. The runtime under it is built with `RUNTIME_FLOW` (no summaries; its indexer never runs).

    oracle = MassOracle(cfg, num_layers=30)
    cache = HybridCache(model, dataclasses.replace(cfg, flow=RUNTIME_FLOW), selector=oracle)

`HybridCache` calls `admit` once per request (its real tokens' keys, in request order) and
`select` before each decode layer's `run`, layers in order.
"""

from __future__ import annotations

import operator

import torch

from .. import reference
from ..config import HybridConfig
from ..contracts import is_count

MASS_FLOW = "mass"
"""The eval's name for the oracle (`--flow mass`); not a registered vflow flow."""
RUNTIME_FLOW = "streaming"
"""The flow the runtime under the oracle is built with: no summaries to keep, and its indexer never
runs (every layer gets the oracle's selection)."""


def page_mass(q: torch.Tensor, keys: torch.Tensor, page_size: int) -> torch.Tensor:
    """float64 [Hkv, ceil(T / page_size)]: the attention mass of each page, summed over each KV
    head's query heads. q [Hq, D] (one decode query), keys [T, Hkv, D] (every key it attends, token
    t in page t // page_size); the scale is D ** -0.5."""
    hq, D = q.shape
    T, hkv, _ = keys.shape
    logits = torch.einsum("hgd,thd->hgt", q.double().view(hkv, hq // hkv, D), keys.double())
    probs = torch.softmax(logits * D ** -0.5, -1).sum(1)                          # [Hkv, T]
    pages = -(-T // page_size)
    tok_page = torch.arange(T, device=keys.device) // page_size
    return probs.new_zeros(hkv, pages).index_add_(1, tok_page, probs)


def mass_selection(q: torch.Tensor, keys: torch.Tensor, cfg: HybridConfig) -> torch.Tensor:
    """int32 [Hkv, cfg.budget_for(pages)]: the pages of the most mass (module docstring), sorted,
    -1 padded; q [Hq, D], keys [T, Hkv, D] with T >= 1."""
    return top_mass_pages(page_mass(q, keys, cfg.page_size), cfg)


def top_mass_pages(mass: torch.Tensor, cfg: HybridConfig) -> torch.Tensor:
    """`mass_selection` from the page mass [Hkv, pages] (`page_mass`)."""
    n = mass.shape[1]
    budget = cfg.budget_for(n)
    return reference.topk_pages(mass[None], budget,
                                torch.tensor([n], dtype=torch.int32, device=mass.device),
                                cfg.sink_pages, cfg.recent_pages)[0]


class MassOracle:
    """The mass oracle for one `HybridCache` (module docstring): a copy of every request's keys per
    layer, and per decode layer the selection of the step's queries. Not reusable after an
    undone step (the runtime's cancel): build a new cache and oracle."""

    def __init__(self, cfg: HybridConfig, num_layers: int) -> None:
        if not isinstance(cfg, HybridConfig):
            raise ValueError(f"cfg must be a HybridConfig, got {type(cfg).__name__}")
        if cfg.calibration is not None:
            raise ValueError("MassOracle selects at the uniform budget (HybridConfig.budget_for); "
                             f"cfg.calibration={cfg.calibration!r} must be None")
        if cfg.placement == "dense":
            raise ValueError("MassOracle selects pages for a sparse placement; cfg.placement is "
                             "'dense'")
        if not is_count(num_layers) or num_layers < 1:
            raise ValueError(f"num_layers={num_layers!r} must be a positive integer")
        self.cfg, self.num_layers = cfg, operator.index(num_layers)
        self._keys: list[torch.Tensor] = []   # per request: [L, capacity, Hkv, D]
        self._lens: list[int] = []            # per request: tokens before this step
        self._next_layer = 0
        self.last_mass: list[torch.Tensor] = []
        """Per batch row, the page mass [Hkv, pages] (`page_mass`) of the last `select` (for
        diagnostics)."""

    def admit(self, keys: torch.Tensor) -> None:
        """One more request (the next batch row): keys [L, T, Hkv, D] of its tokens, T >= 0."""
        if self._next_layer:
            raise ValueError("MassOracle.admit during a decode step (layer "
                             f"{self._next_layer} is next)")
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or \
                keys.shape[0] != self.num_layers or not keys.is_floating_point():
            raise ValueError(f"keys must be a float tensor [{self.num_layers}, T, Hkv, D], got "
                             f"{getattr(keys, 'dtype', type(keys).__name__)} "
                             f"{tuple(getattr(keys, 'shape', ()))}")
        if self._keys and keys.shape[2:] != self._keys[0].shape[2:]:
            raise ValueError(f"keys have {tuple(keys.shape[2:])} (Hkv, D); the requests admitted "
                             f"before have {tuple(self._keys[0].shape[2:])}")
        L, T, hkv, D = keys.shape
        buf = keys.new_zeros(L, max(2 * T, 64), hkv, D)
        buf[:, :T] = keys
        self._keys.append(buf)
        self._lens.append(T)

    @torch.inference_mode()
    def select(self, layer: int, q: torch.Tensor, k_new: torch.Tensor) -> torch.Tensor:
        """sel int32 [B, Hkv, K] (K: the batch's widest budget, -1 padded) for `layer` of this step,
        after appending each row's new key k_new [B, Hkv, D]; q [B, Hq, D]. Layers in order."""
        if layer != self._next_layer:
            raise ValueError(f"layer={layer!r}: layers run in order; layer {self._next_layer} "
                             "is next")
        B = len(self._keys)
        if not B:
            raise ValueError("MassOracle.select before any request was admitted")
        _, hkv, D = self._keys[0].shape[1:]
        for name, t, want in (("q", q, None), ("k_new", k_new, (B, hkv, D))):
            ok = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 3 and (
                tuple(t.shape) == want if want else
                (t.shape[0], t.shape[2]) == (B, D) and t.shape[1] % hkv == 0 and t.shape[1] > 0)
            if not ok:
                shape = want or f"{B}, Hq (a multiple of {hkv}), {D}"
                raise ValueError(f"{name} must be a float tensor [{shape}], got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        sels, self.last_mass = [], []
        for b in range(B):
            n = self._lens[b]
            if n + 1 > self._keys[b].shape[1]:          # grow: the step's token needs a slot
                old = self._keys[b]
                self._keys[b] = old.new_zeros(old.shape[0], 2 * old.shape[1], hkv, D)
                self._keys[b][:, :n] = old[:, :n]
            keys = self._keys[b][layer]
            keys[n] = k_new[b].to(keys.device, keys.dtype)
            mass = page_mass(q[b].to(keys.device), keys[:n + 1], self.cfg.page_size)
            self.last_mass.append(mass)
            sels.append(top_mass_pages(mass, self.cfg))
        width = max(s.shape[1] for s in sels)
        sel = torch.full((B, hkv, width), -1, dtype=torch.int32)
        for b, s in enumerate(sels):
            sel[b, :, :s.shape[1]] = s
        self._next_layer += 1
        if self._next_layer == self.num_layers:          # the step is done: every row grew
            self._next_layer = 0
            self._lens = [n + 1 for n in self._lens]
        return sel.to(q.device)
