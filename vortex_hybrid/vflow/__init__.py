"""vFlow: sparse-attention algorithms as small Python programs over page-centric tensors (vTensor).

    from vortex_hybrid import vflow
    from vortex_hybrid.vflow import ops

    @vflow.register("my_flow")
    class MyFlow(vflow.Flow):
        def create_cache(self, page_size, head_dim):     # summaries per page and KV head
            return {"mean": (1, head_dim)}
        def forward_cache(self, keys, cache):            # keys (page_size, D) of one full page
            cache["mean"] = keys.mean(0, keepdim=True)
        def forward_indexer(self, q, cache):             # q (G, D); cache["mean"] (pages, 1, D)
            return ops.topk(ops.gemm(q, cache["mean"]).sum((-2, -1)))

    sel = vflow.select_pages("my_flow", q, k_pool, page_table, seq_lens, budget, sink, recent)

A flow is traced once per shape into a small IR (`graph`), checked (`compiler`, errors name the op
and the flow's line), and run by the reference interpreter (`interpreter`) on any torch device, or by
fused kernels registered through `lowering`. Library flows: streaming, quest, centroid, oracle,
double_sparsity, lowbit. See docs/vflow.md.
"""

from . import ops
from .compiler import CompiledFlow, compile_flow
from .errors import FlowError
from .flow import Codes, Flow
from .graph import PAGES
from .bound_flow import BoundFlow, bind_flow
from .lowering import find_lowering, register_lowering, registered_lowerings, unregister_lowering
from .registry import list_flows, load_flow, register
from .select import page_scores, select_pages
from .vtensor import Selection, VTensor

from . import flows  # noqa: E402,F401  (registers the library flows: list_flows/load_flow see them)

__all__ = ["BoundFlow", "Codes", "CompiledFlow", "Flow", "FlowError", "PAGES", "Selection", "VTensor",
           "bind_flow", "compile_flow",
           "find_lowering", "list_flows", "load_flow", "ops", "page_scores", "register",
           "register_lowering", "registered_lowerings", "select_pages", "unregister_lowering"]
