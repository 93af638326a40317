"""`centroid`: score pages by the query's dot product with the page's mean key."""

from __future__ import annotations

from .. import ops
from ..flow import Flow
from ..registry import register
from .gqa import check_gqa, gqa_topk


@register("centroid")
class Centroid(Flow):
    """Centroid routing, as in the block-top-k routing of Kinetics (Sadhukhan et al.,
    arXiv:2506.05333) and the page centroids of Vortex's block-sparse flow.

    Summary per page and KV head: "mean" (1, D), the mean key of the page. Score of page p for a
    KV head: sum over its query heads j of q_j . mean_p.

    Option `gqa`: how the group's query heads combine ("sum" as above, "max", "softmax" or
    "union"; `flows.gqa`). The softmax scale is head_dim ** -0.5.
    """

    def __init__(self, gqa: str = "sum") -> None:
        self.gqa = check_gqa(gqa)

    def create_cache(self, page_size, head_dim):
        return {"mean": (1, head_dim)}

    def forward_cache(self, keys, cache):
        cache["mean"] = keys.mean(0, keepdim=True)

    def forward_indexer(self, q, cache):
        dots = ops.gemm(q, cache["mean"])                               # (pages, 1, G)
        if self.gqa == "sum":
            return ops.topk(dots.sum((-2, -1)))         # the lowered kernels' graph
        return gqa_topk(dots.sum(-2), self.gqa, q.shape[-1] ** -0.5)
