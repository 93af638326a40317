"""How the page scores of a KV head's query heads combine into one selection (GQA).

A flow that scores pages per query head (score (pages, G)) ends in `gqa_topk(score, gqa)`:

- "sum": the sum over the group (the default of quest, centroid and double_sparsity: one dot
  product with the summed query);
- "max": the largest score of the group, so a page one query head needs is not outvoted (the
  default of lowbit);
- "softmax": the sum over the group of each head's softmax over the pages of its scaled score
  (`scale`, e.g. head_dim ** -0.5): each query head's estimate of its attention by page, summed,
  so every head weighs the same whatever the scale of its scores;
- "union": each query head chooses its own best pages, the free budget split equally between them
  (`ops.union`).
"""

from __future__ import annotations

from .. import ops
from ..vtensor import Selection, VTensor

GQA = ("sum", "max", "softmax", "union")


def check_gqa(gqa: str) -> str:
    """`gqa` if it is one of GQA; ValueError naming the allowed values otherwise."""
    if gqa not in GQA:
        raise ValueError(f"gqa={gqa!r} must be one of {list(GQA)}")
    return gqa


def gqa_topk(score: VTensor, gqa: str, scale: float = 1.0) -> Selection:
    """The selection from per-query-head page scores `score` (pages, G) combined by `gqa`."""
    if gqa == "sum":
        return ops.topk(score.sum(-1))
    if gqa == "max":
        return ops.topk(score.max(-1))
    if gqa == "softmax":
        return ops.topk(ops.softmax(score, 0, scale).sum(-1))
    heads = score.shape[-1]
    if heads == 1:
        return ops.topk(score.sum(-1))
    return ops.union(*(ops.topk(ops.take(score, [j], -1).sum(-1)) for j in range(heads)))
