"""`oracle`: exact page scores from every key (the ceiling of page-level selection)."""

from __future__ import annotations

from .. import ops
from ..flow import Flow
from ..registry import register


@register("oracle")
class Oracle(Flow):
    """Oracle top-k over pages, the accuracy ceiling used by Quest (arXiv:2406.10774) and
    Double Sparsity (arXiv:2408.07092) to judge approximate page scores.

    No summaries: reads every page's keys, cache["k"] (pages, page_size, D). Score of page p for a
    KV head: max over the page's tokens t and its query heads j of q_j . k_t. Costs a full key scan
    per step, so it is a reference, not a serving flow.
    """

    def forward_indexer(self, q, cache):
        dots = ops.gemm(q, cache["k"])                   # (pages, page_size, G)
        return ops.topk(dots.max((-2, -1)))
