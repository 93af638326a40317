"""`lowbit`: score each page by its best key, every key quantized to a few bits per channel."""

from __future__ import annotations

from .. import ops
from ..flow import Codes, Flow
from ..registry import register
from .gqa import check_gqa, gqa_topk

BITS = (1, 2, 3, 4)
"""Allowed code widths (bits per key channel)."""
_TINY = 1e-20
"""Floor of a channel's range in the division that codes it (a constant channel codes to 0)."""


@register("lowbit")
class LowBit(Flow):
    """Token-level page scores from low-bit keys: each key of a page is quantized per channel on
    the page's own key range (the elementwise min and max of Quest, arXiv:2406.10774, used as the
    asymmetric per-channel grid of KIVI's key quantization, arXiv:2402.02750), and a page scores
    the best query-key product over its tokens, as the `oracle` does over exact keys.

    Summaries per page and KV head: "kmin", "kmax" (1, D), in the store's dtype; "codes"
    (page_size, D), each key's channel d coded as the integer c in [0, L] (L = 2 ** bits - 1)
    nearest to L * (k_d - kmin_d) / (kmax_d - kmin_d), computed in float32 from the unrounded
    kmin/kmax (halves round up; a channel of zero range codes 0), declared `Codes` so stores keep
    it packed in `bits` bits per key channel (`vortex_hybrid.packed_codes`; 2 bits: 1/8 of a bf16
    key, and with kmin/kmax in bf16 at page 16 a quarter of the page's key bytes). Indexer: the
    decoded key k^_d = kmin_d + c_d * (kmax_d - kmin_d) / L; score of page p for query head j: max
    over the page's tokens t of q_j . k^_t.

    Fused kernels (`flow_kernels`: lowbit_cache, lowbit_indexer on both backends) serve the
    default bits=2 with gqa "max"; other options run the reference interpreter (the kernels take
    any code width, but lowerings match the library flow's traced graph, `vflow.lowering`).

    Options: `bits` (1-4, default 2); `gqa`, how the group's query heads combine (`flows.gqa`;
    default "max": the page of one query head's best key is not outvoted by the group's other
    heads, which is what keeps a retrieval head's needle; "sum", "softmax" with scale
    head_dim ** -0.5, "union").
    """

    def __init__(self, bits: int = 2, gqa: str = "max") -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
            raise ValueError(f"bits={bits!r} must be one of {list(BITS)}")
        self.bits = bits
        self.gqa = check_gqa(gqa)

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def create_cache(self, page_size, head_dim):
        return {"kmin": (1, head_dim), "kmax": (1, head_dim),
                "codes": Codes(page_size, head_dim, self.bits)}

    def forward_cache(self, keys, cache):                                  # keys: (P, D)
        kmin = keys.min(0, keepdim=True)
        kmax = keys.max(0, keepdim=True)
        cache["kmin"] = kmin
        cache["kmax"] = kmax
        t = (keys - kmin) / ops.maximum(kmax - kmin, _TINY) * self.levels   # (P, D) in [0, L]
        codes = ops.where(t >= 0.5, 1.0, 0.0)
        for level in range(2, self.levels + 1):
            codes = codes + ops.where(t >= level - 0.5, 1.0, 0.0)
        cache["codes"] = codes

    def forward_indexer(self, q, cache):                                   # q: (G, D)
        step = (cache["kmax"] - cache["kmin"]) / self.levels               # (pages, 1, D)
        keys = cache["kmin"] + cache["codes"] * step                       # (pages, P, D)
        best = ops.gemm(q, keys).max(-2)                                   # (pages, G)
        return gqa_topk(best, self.gqa, q.shape[-1] ** -0.5)
