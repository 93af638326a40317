"""CUDA graphs of the per-layer GPU work of the `dense` and `gpu` placements.

An eager layer launches a dozen kernels (token write, page scores, top-k, attention, small torch
ops), each costing more host time than the kernel at small batches (docs/hardware.md). Here each
layer's work (`HybridAttention._append` + `attend_resident`) is captured once per batch shape into a
`torch.cuda.CUDAGraph` over static buffers; a step then copies its inputs (q, k_new, v_new) into the
buffers and replays: three copies and one replay per layer.

A shape is (batch size, page-table width rounded up to a power of two, the budget groups). `bind`
copies the step's tables into the shape's buffers once per step (padding with -1, which the kernels
never read past each request's pages) and returns the set of graphs; layers are captured on first
use. Up to MAX_SHAPES shapes are kept (least recently used dropped). Pages filled by the step's token
are summarised outside the graph (their number varies); the output is cloned out of the static
buffer so it stays valid after the next replay.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .hybrid_attention import HybridAttention
    from .step_plan import StepPlan

log = logging.getLogger(__name__)

MAX_SHAPES = 4


def _padded(t: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.full((t.shape[0], width), -1, dtype=t.dtype, device=t.device)
    out[:, :t.shape[1]] = t
    return out


class _GraphSet:
    """Static buffers and per-layer graphs for one batch shape."""

    def __init__(self, attn: "HybridAttention", step: "StepPlan", width: int) -> None:
        self.attn = attn
        dev_table = _padded(step.dev_table, width)
        s_table = None if step.s_table is None else _padded(step.s_table, width)
        self.step = dataclasses.replace(
            step, dev_table=dev_table, s_table=s_table, lens=step.lens.clone(),
            s_lens=None if step.s_lens is None else step.s_lens.clone(),
            write_pages=step.write_pages.clone(), write_offs=step.write_offs.clone(),
            groups={k: v.clone() for k, v in step.groups.items()})
        self.inputs: Optional[tuple[torch.Tensor, ...]] = None
        self.graphs: list[Optional[torch.cuda.CUDAGraph]] = [None] * attn.num_layers
        self.outputs: list[Optional[torch.Tensor]] = [None] * attn.num_layers
        self.pool = torch.cuda.graph_pool_handle()
        self.failures = 0

    def load(self, step: "StepPlan") -> None:
        """Copy a new step's tables into the static buffers (same shape)."""
        s = self.step
        s.dev_table[:, :step.dev_table.shape[1]].copy_(step.dev_table)
        s.dev_table[:, step.dev_table.shape[1]:].fill_(-1)
        if s.s_table is not None:
            s.s_table[:, :step.s_table.shape[1]].copy_(step.s_table)
            s.s_table[:, step.s_table.shape[1]:].fill_(-1)
            s.s_lens.copy_(step.s_lens)
        s.lens.copy_(step.lens)
        s.write_pages.copy_(step.write_pages)
        s.write_offs.copy_(step.write_offs)

    def _body(self, layer: int) -> torch.Tensor:
        q, k_new, v_new = self.inputs
        self.attn._append(self.step, layer, k_new, v_new)
        return self.attn.attend_resident(self.step, layer, q)

    def run(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
            ) -> torch.Tensor:
        if self.inputs is None or self.inputs[0].dtype != q.dtype or \
                self.inputs[1].dtype != k_new.dtype:
            self.inputs = (torch.empty_like(q), torch.empty_like(k_new), torch.empty_like(v_new))
            self.graphs = [None] * self.attn.num_layers
        for buf, t in zip(self.inputs, (q, k_new, v_new)):
            buf.copy_(t)
        graph = self.graphs[layer]
        if graph is None:
            return self._capture(layer)
        graph.replay()
        return self.outputs[layer].clone()

    def _capture(self, layer: int) -> torch.Tensor:
        """Run the layer eagerly on a side stream (twice: every kernel compiled and loaded, the
        allocator warm; the result is this step's output), then capture it there. The capture
        records without running; the K/V write it records is idempotent. Errors of other threads'
        CUDA calls (the CPU worker) do not break the capture (thread_local mode)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            for _ in range(2):
                out = self._body(layer)
            gc.collect()                    # freeing another runtime's CUDA memory or graphs
            gc.disable()                    # while capturing would invalidate the capture
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=stream,
                                      capture_error_mode="thread_local"):
                    self.outputs[layer] = self._body(layer)
            except RuntimeError as exc:     # the eager result stands; try again next step
                log.warning("CUDA graph capture of layer %d failed, running it eagerly: %s",
                            layer, exc)
                graph = None
                self.failures += 1
            finally:
                gc.enable()
        torch.cuda.current_stream().wait_stream(stream)
        self.graphs[layer] = graph
        return out


class LayerGraphs:
    """The graph sets of a `HybridAttention`, per batch shape (module docstring)."""

    def __init__(self, attn: "HybridAttention") -> None:
        self.attn = attn
        self._sets: "OrderedDict[tuple, _GraphSet]" = OrderedDict()
        self._bound: Optional[tuple[int, _GraphSet]] = None   # (serial of the step, its set)

    def bind(self, step: "StepPlan") -> _GraphSet:
        """The graph set for this step's shape, holding this step's tables."""
        if self._bound is not None and self._bound[0] == step.serial:
            return self._bound[1]
        width = max(16, 1 << max(step.dev_table.shape[1] - 1, 0).bit_length())
        key = (len(step.rids), width, tuple((b, tuple(r.tolist()))
                                            for b, r in sorted(step.groups.items())))
        graphs = self._sets.get(key)
        if graphs is None:
            graphs = self._sets[key] = _GraphSet(self.attn, step, width)
            while len(self._sets) > MAX_SHAPES:
                self._sets.popitem(last=False)
        else:
            self._sets.move_to_end(key)
            graphs.load(step)
        self._bound = (step.serial, graphs)
        return graphs
