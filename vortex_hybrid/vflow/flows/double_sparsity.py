"""`double_sparsity`: Quest's key bounds on a small subset of heavy channels."""

from __future__ import annotations

from typing import Optional, Sequence

from .. import ops
from ..flow import Flow
from ..registry import register
from .gqa import check_gqa, gqa_topk


@register("double_sparsity")
class DoubleSparsity(Flow):
    """Channel-subset page scores, after Double Sparsity (Yang et al., "Post-Training Sparse
    Attention with Double Sparsity", arXiv:2408.07092): a few "heavy" channels, found offline,
    approximate q . k well, so a label cache over those channels is enough to rank tokens. Here the
    labels are per page: the Quest bounds (arXiv:2406.10774) of the page's keys on the heavy
    channels only, so summaries cost C / D of Quest's.

    Summaries per page and KV head: "kmin", "kmax" (1, C). Score of page p: sum over the group's
    query heads j and the heavy channels d of max(q_jd * kmax_pd, q_jd * kmin_pd).

    Options: `channels`, the heavy channel indices (from offline calibration, e.g. passed through
    HybridConfig.extra), or `num_channels` (default head_dim // 8, at least 1) evenly spaced
    channels when uncalibrated; `gqa`, how the group's query heads combine ("sum" as above, "max",
    "softmax" or "union"; `flows.gqa`; the softmax scale is head_dim ** -0.5).
    """

    def __init__(self, channels: Optional[Sequence[int]] = None,
                 num_channels: Optional[int] = None, gqa: str = "sum") -> None:
        if channels is not None and (isinstance(channels, (str, bytes)) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0
                for c in (channels if isinstance(channels, (list, tuple)) else [None]))
                or not channels):
            raise ValueError(f"channels={channels!r} must be a non-empty list of channel indices "
                             "(e.g. [0, 5, 17]); for a count of evenly spaced channels use "
                             "num_channels")
        if num_channels is not None and (isinstance(num_channels, bool)
                                         or not isinstance(num_channels, int) or num_channels < 1):
            raise ValueError(f"num_channels={num_channels!r} must be a positive integer")
        self.channels = None if channels is None else list(channels)
        self.num_channels = num_channels
        self.gqa = check_gqa(gqa)

    def heavy_channels(self, head_dim: int) -> list[int]:
        if self.channels is not None:
            return self.channels
        n = self.num_channels or max(1, head_dim // 8)
        return sorted({(i * head_dim) // n for i in range(n)})

    def create_cache(self, page_size, head_dim):
        c = len(self.heavy_channels(head_dim))
        return {"kmin": (1, c), "kmax": (1, c)}

    def forward_cache(self, keys, cache):
        heavy = ops.take(keys, self.heavy_channels(keys.shape[-1]), dim=-1)   # (page_size, C)
        cache["kmin"] = heavy.min(0, keepdim=True)
        cache["kmax"] = heavy.max(0, keepdim=True)

    def forward_indexer(self, q, cache):
        qc = ops.take(q, self.heavy_channels(q.shape[-1]), dim=-1)             # (G, C)
        bound = ops.maximum(qc * cache["kmax"], qc * cache["kmin"])            # (pages, G, C)
        if self.gqa == "sum":
            return ops.topk(bound.sum((-2, -1)))
        return gqa_topk(bound.sum(-1), self.gqa, q.shape[-1] ** -0.5)
