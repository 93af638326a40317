"""This backend's flow kernels for the vFlow lowering hook for device "cuda".

`vortex_hybrid.vflow.lowering` reads `LOWERINGS` when it first looks for "cuda" kernels (this
module imports nothing from vflow: the dependency goes one way). A lowering is registered against a library flow's traced
graph: any flow whose stage traces to the same structure runs on it (`vortex_hybrid.vflow.lowering`);
every other (flow, stage) runs on the reference interpreter. The mirror of `cpu_kernels.lowerings`.

    quest:    cache -> page_summaries.quest_cache      indexer -> page_scoring.quest_indexer
    centroid: cache -> page_summaries.centroid_cache   indexer -> page_scoring.centroid_indexer
"""

from __future__ import annotations

from .page_scoring import centroid_indexer, quest_indexer
from .page_summaries import centroid_cache, quest_cache

LOWERINGS = {
    ("quest", "cache"): quest_cache,
    ("quest", "indexer"): quest_indexer,
    ("centroid", "cache"): centroid_cache,
    ("centroid", "indexer"): centroid_indexer,
}
