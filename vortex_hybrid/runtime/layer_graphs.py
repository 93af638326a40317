"""CUDA graphs of the per-layer GPU work of every placement.

An eager layer launches dozens of kernels (token write, page scores, top-k, cache step, attention,
small torch ops), each costing more host time than the kernel at small batches (docs/hardware.md).
Here each layer's GPU work is captured once per batch shape into `torch.cuda.CUDAGraph`s over
static buffers; a step then copies its inputs (q, k_new, v_new, and a replayed selection) into the
buffers and replays. `dense` and `gpu` capture a layer whole (one part, "layer"); the host
placements capture the two parts around the CPU hand-off ("front": append, select, partition, GPU
page cache, the host's share copied to pinned buffers; "back": fetch and attend), since the CPU
worker must start between them. Neither part synchronises with the host, which is what lets them be
captured: the page cache's state and fetch count stay on the device (`scheduler.gpu_page_cache`).

A shape is (batch size, page-table width rounded up to a power of two, the budget groups, the
replayed selection's width, the page cache's generation, the step shape). `bind` copies the step's tables into the
shape's buffers once per step (padding with -1, which the kernels never read past each request's
pages) and returns the set of graphs; parts are captured on first use. Capturing runs a part twice
eagerly (kernels compiled, allocator warm), restoring the state the part changes (the page cache's
layer) after each run, then captures it and replays it once: the part's effects happen once and its
outputs are always the graph's static ones. Up to MAX_SHAPES shapes are kept (least recently used
dropped). Pages filled by the step's token are summarised outside the graphs (their number varies).
A new shape starts with one garbage collection (a cyclic collection freeing another runtime's CUDA
memory during a capture would invalidate it); collection stays disabled while a part is captured.
A failed capture leaves the state as before and raises `CaptureFailed`; the runtime then runs that
layer eagerly and tries again on the next step, up to MAX_FAILURES times per part and shape (a
capture costs a garbage collection), then runs the part eagerly for good.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from .cpu_worker import HostBuffers

if TYPE_CHECKING:
    from .hybrid_attention import HybridAttention
    from .step_plan import StepPlan

log = logging.getLogger(__name__)

MAX_SHAPES = 4
MAX_FAILURES = 2
Body = Callable[["StepPlan", dict], tuple]


class CaptureFailed(RuntimeError):
    """A part could not be captured; nothing it changes was changed."""


def _padded(t: Optional[torch.Tensor], width: int) -> Optional[torch.Tensor]:
    """A table's copy `width` wide in its last dimension, -1 padded."""
    if t is None:
        return None
    out = torch.full((*t.shape[:-1], width), -1, dtype=t.dtype, device=t.device)
    out[..., :t.shape[-1]] = t
    return out


def _load_padded(dst: Optional[torch.Tensor], src: Optional[torch.Tensor]) -> None:
    if dst is not None:
        dst[..., :src.shape[-1]].copy_(src)
        dst[..., src.shape[-1]:].fill_(-1)


class _GraphSet:
    """Static buffers and per-(layer, part) graphs for one batch shape."""

    def __init__(self, attn: "HybridAttention", step: "StepPlan", width: int) -> None:
        self.attn = attn
        clone = (lambda t: None if t is None else t.clone())
        self.step = dataclasses.replace(
            step, dev_table=_padded(step.dev_table, width), s_table=_padded(step.s_table, width),
            host_table_dev=_padded(step.host_table_dev, width), lens=step.lens.clone(),
            s_lens=clone(step.s_lens), write_pages=step.write_pages.clone(),
            write_offs=step.write_offs.clone(), cache_rows=clone(step.cache_rows),
            cpu_rows=clone(step.cpu_rows), nonfinite=clone(step.nonfinite),
            groups={k: v.clone() for k, v in step.groups.items()},
            host_table=_padded(step.host_table, width), lens_cpu=step.lens_cpu.clone(),
            counts=step.counts.clone(), sum_rows=clone(step.sum_rows),
            dev_heads=_padded(step.dev_heads, width), host_heads=_padded(step.host_heads, width),
            lens_heads=clone(step.lens_heads), budgets=clone(step.budgets),
            cached_heads=_padded(step.cached_heads, width))
        self.ran = torch.zeros(1, dtype=torch.int64, device=step.lens.device)
        """Layers of a whole step that ran (`whole_step`: each layer adds 1 on the device)."""
        self.cpu_io: dict[str, torch.Tensor] = {}
        """A whole step's hand-off buffers (`whole_step`): q, sel in; o, lse out."""
        self.cpu_pages = 0
        """Page-heads the CPU attended in the bound whole step (its CPU part counts them)."""
        self.cpu_s = 0.0
        """Seconds the hand-off worker spent in the bound whole step's CPU parts."""
        self.cpu_kernel_s = 0.0
        """Of `cpu_s`, seconds in the CPU attention's call (the rest: the worker's own path)."""
        self.cpu_calls = 0
        """CPU attention calls of the bound whole step (layers whose host part was not empty)."""
        self.split = False
        """Whether the whole step's layers ran split (host placements, or a given selection)."""
        self.given = False
        """Whether the whole step's layers attended a given selection (`run(sel=...)`)."""
        self.inputs: dict[str, torch.Tensor] = {}
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, str], tuple] = {}
        cuda = step.lens.device.type == "cuda"
        self.pinned = HostBuffers(pin=cuda)
        self.pool = torch.cuda.graph_pool_handle() if cuda else None
        self.failures: dict[tuple[int, str], int] = {}

    def load(self, step: "StepPlan") -> None:
        """Copy a new step's tables into the static buffers (same shape)."""
        s = self.step
        for name in ("dev_table", "s_table", "host_table_dev", "host_table", "dev_heads",
                     "host_heads", "cached_heads"):
            _load_padded(getattr(s, name), getattr(step, name))
        for name in ("lens", "s_lens", "write_pages", "write_offs", "cache_rows", "cpu_rows",
                     "nonfinite", "lens_cpu", "counts", "sum_rows", "lens_heads", "budgets"):
            if getattr(s, name) is not None:
                getattr(s, name).copy_(getattr(step, name))
        self.ran.zero_()
        self.cpu_pages = 0
        self.cpu_s = 0.0
        self.cpu_kernel_s = 0.0
        self.cpu_calls = 0

    def run(self, layer: int, part: str, body: Body, state: Sequence[torch.Tensor] = (),
            **tensors: torch.Tensor) -> tuple:
        """Copy `tensors` into the static inputs, replay (layer, part) or capture it first; returns
        its static outputs (valid until its next replay). `state`: tensors the part changes, kept
        as they were by the capture's warm-up runs."""
        for name, t in tensors.items():
            buf = self.inputs.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                self.inputs[name] = torch.empty_like(t)
                self.graphs.clear()                  # captured over the old buffers
                self.outputs.clear()
            self.inputs[name].copy_(t)
        key = (layer, part)
        graph = self.graphs.get(key)
        if graph is None and self.failures.get(key, 0) >= MAX_FAILURES:
            raise CaptureFailed(f"layer {layer} ({part}) runs eagerly after "
                                f"{MAX_FAILURES} failed captures")
        if graph is None:
            self._capture(key, body, state)
        else:
            graph.replay()
        return self.outputs[key]

    def _capture(self, key: tuple[int, str], body: Body, state: Sequence[torch.Tensor]) -> None:
        """Warm up on a side stream (twice, restoring `state` after each run), capture there,
        then replay once. Errors of other threads' CUDA calls (the CPU worker) do not break the
        capture (thread_local mode)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            saved = [t.clone() for t in state]
            for _ in range(2):
                body(self.step, self.inputs)
                for t, old in zip(state, saved):
                    t.copy_(old)
            gc.disable()                    # freeing another runtime's CUDA memory or graphs
                                            # while capturing would invalidate the capture
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=stream,
                                      capture_error_mode="thread_local"):
                    out = body(self.step, self.inputs)
            except RuntimeError as exc:
                self.failures[key] = self.failures.get(key, 0) + 1
                for k in [k for k in self.graphs if k[0] == key[0]]:
                    del self.graphs[k]      # the layer's other part read this one's outputs
                log.warning("CUDA graph capture of layer %d (%s) failed, running it eagerly: %s",
                            key[0], key[1], exc)
                raise CaptureFailed(str(exc)) from exc
            finally:
                gc.enable()
            graph.replay()
        torch.cuda.current_stream().wait_stream(stream)
        self.graphs[key] = graph
        self.outputs[key] = out


class LayerGraphs:
    """The graph sets of a `HybridAttention`, per batch shape (module docstring)."""

    def __init__(self, attn: "HybridAttention") -> None:
        self.attn = attn
        self._sets: "OrderedDict[tuple, _GraphSet]" = OrderedDict()
        self._bound: Optional[tuple[tuple, _GraphSet]] = None   # ((serial, sel width), its set)
        self._whole: dict[tuple, _GraphSet] = {}                 # whole steps' static sets

    def bound_set(self, step: "StepPlan") -> Optional[_GraphSet]:
        """The graph set bound to `step` (its static copy of the step holds what the graphs
        wrote, e.g. `nonfinite`), or None when the step ran eagerly."""
        if self._bound is not None and self._bound[0][0] == step.serial:
            return self._bound[1]
        return None

    def bind(self, step: "StepPlan", sel: Optional[torch.Tensor] = None) -> Optional[_GraphSet]:
        """The graph set for this step's shape, holding this step's tables; None when the layer
        cannot be captured (a flow selecting without a fused kernel)."""
        attn = self.attn
        if sel is None and not attn.selection_captures:
            return None
        sel_width = None if sel is None else sel.shape[-1]
        if self._bound is not None and self._bound[0] == (step.serial, sel_width):
            return self._bound[1]
        key, width = self._key(step, sel_width)
        graphs = self._sets.get(key)
        if graphs is None:
            gc.collect()        # once per shape: what other runtimes left is freed before capturing
            graphs = self._sets[key] = _GraphSet(attn, step, width)
            while len(self._sets) > MAX_SHAPES:
                self._sets.popitem(last=False)
        else:
            self._sets.move_to_end(key)
            graphs.load(step)
        self._bound = ((step.serial, sel_width), graphs)
        return graphs

    def _key(self, step: "StepPlan", sel_width: Optional[int]) -> tuple[tuple, int]:
        """The shape a step's graphs are captured for, and its page-table width."""
        attn = self.attn
        width = max(16, 1 << max(step.dev_table.shape[1] - 1, 0).bit_length())
        generation = 0
        if attn._cache is not None:
            attn._cache.reserve(width)
            generation = attn._cache.generation
        key = (len(step.rids), width, tuple((b, tuple(r.tolist()))
                                            for b, r in sorted(step.groups.items())),
               sel_width, generation, step.shape, step.budget_key)
        return key, width

    def bind_whole(self, step: "StepPlan") -> tuple[tuple, _GraphSet]:
        """The static set of a whole step (`whole_step`) for this step's shape, loaded with its
        tables, and the shape's key. These sets are never dropped: a caller's graph captured over
        one reads its buffers for as long as the runtime lives. A fixed-shape step's key names its
        `FixedShape`, selection width, the page cache's generation and the step shape only
        (`fixed_shape`)."""
        if step.fixed is not None:
            shape, attn = step.fixed, self.attn
            width = shape.max_pages
            generation = 0
            if attn._cache is not None:
                attn._cache.reserve(width)
                generation = attn._cache.generation
            key = ("whole", "fixed", shape.batch, width, step.width, generation, step.shape)
        else:
            key, width = self._key(step, None)
            key = ("whole",) + key
        graphs = self._whole.get(key)
        if graphs is None:
            graphs = self._whole[key] = _GraphSet(self.attn, step, width)
        graphs.load(step)
        return key, graphs
