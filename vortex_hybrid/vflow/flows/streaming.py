"""`streaming`: attention sinks plus a window of the most recent pages."""

from __future__ import annotations

from .. import ops
from ..flow import Flow
from ..registry import register


@register("streaming")
class Streaming(Flow):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
    arXiv:2309.17453): keep the first tokens (sinks) and a recent window, ignore the query.

    No summaries. Page p scores p, so the budget left after the sink pages goes to the latest
    pages: the selection is the first `sink` pages and the last `budget - sink` pages.
    """

    def forward_indexer(self, q, cache):
        return ops.topk(ops.page_index())
