"""This backend's library-flow kernels, checked, and their table for the vFlow lowering hook.

`vortex_hybrid.flow_kernels.entry_points` wraps the unchecked launchers of `page_summaries` and
`page_scoring` into `quest_cache`, `centroid_cache`, `lowbit_cache`, `quest_indexer`,
`centroid_indexer`, `lowbit_indexer` (the same wrapper for both backends).
`vortex_hybrid.vflow.lowering` reads LOWERINGS when it first looks for
"cuda" kernels; a lowering serves every flow whose stage traces to the library flow's structure.
This module imports nothing from vflow: the dependency goes one way. Mirror of `cpu_kernels.lowerings`.
"""

from __future__ import annotations

from vortex_hybrid.flow_kernels import entry_points

from .page_scoring import launch_indexer
from .page_summaries import launch_cache

_kernels = entry_points(launch_cache, launch_indexer)
quest_cache, centroid_cache = _kernels.quest_cache, _kernels.centroid_cache
lowbit_cache, lowbit_indexer = _kernels.lowbit_cache, _kernels.lowbit_indexer
quest_indexer, centroid_indexer = _kernels.quest_indexer, _kernels.centroid_indexer
LOWERINGS = _kernels.LOWERINGS
