"""`quest`: per-page elementwise key bounds give an upper bound on each query-key product."""

from __future__ import annotations

from .. import ops
from ..flow import Flow
from ..registry import register
from .gqa import check_gqa, gqa_topk


@register("quest")
class Quest(Flow):
    """Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
    arXiv:2406.10774).

    Summaries per page and KV head: "kmin", "kmax" (1, D), the elementwise min and max of the
    page's keys. Score of page p for a KV head: sum over its query heads j of
    sum_d max(q_jd * kmax_pd, q_jd * kmin_pd), an upper bound on q_j . k for every key of the page.

    Option `gqa`: how the group's query heads combine ("sum" as above, "max", "softmax" or
    "union"; `flows.gqa`). The softmax scale is head_dim ** -0.5.
    """

    def __init__(self, gqa: str = "sum") -> None:
        self.gqa = check_gqa(gqa)

    def create_cache(self, page_size, head_dim):
        return {"kmin": (1, head_dim), "kmax": (1, head_dim)}

    def forward_cache(self, keys, cache):
        cache["kmin"] = keys.min(0, keepdim=True)
        cache["kmax"] = keys.max(0, keepdim=True)

    def forward_indexer(self, q, cache):
        bound = ops.maximum(q * cache["kmax"], q * cache["kmin"])      # (pages, G, D)
        if self.gqa == "sum":
            return ops.topk(bound.sum((-2, -1)))        # the lowered kernels' graph
        return gqa_topk(bound.sum(-1), self.gqa, q.shape[-1] ** -0.5)
