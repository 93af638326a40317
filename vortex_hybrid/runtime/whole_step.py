"""`WholeStep`: a decode step whose layers all run inside the caller's CUDA graph, the CPU hand-off
of the host placements included (a mixin of `HybridAttention`).

    key = attn.plan(rids, whole_step=True)   # outside any graph: tables into the shape's buffers
    if key not in graphs:                    # a new shape: capture the model's step once
        with torch.cuda.graph(g):
            ...                              # the model's layers, calling attn.run(layer, ...)
        graphs[key] = g
    graphs[key].replay()                     # the whole step: one call
    attn.finish_step()                       # one sync: counters, NaN flags, the CPU's errors

`plan(whole_step=True)` loads the step's tables into static buffers of its shape (`key`: batch
size, page-table width bucket, budget groups, the page cache's generation, the step shape), which
live as long as the runtime, so a graph captured for a key stays valid for every later step of
that key. `run()` in such a step reads only those buffers and never synchronises: captured, it
records the layer; called outside a capture it runs the same work eagerly (without CUDA: CI). Each
layer adds one to a device counter; `finish_step()` reads the counters, the NaN flags and that
counter in one copy, and refuses a step whose layers did not all run (a graph of another key
replayed, or none): that step is undone like any failed one.

Host placements hand the CPU its share inside the graph (`runtime.handoff`): the front part writes
q and the host part of the selection to pinned buffers and publishes the layer (a flag in
host-mapped memory); the persistent worker, polling in compiled code, attends into pinned output
buffers and answers; the GPU's back part (fetches, its own attention) runs meanwhile, then waits
(bounded) for the answer, copies the CPU's state in and merges. A CPU part that raises, or an
answer that does not come within `HANDOFF_TIMEOUT_S`, fails the step at `finish_step()` with the
original exception (or `HandoffTimeout`), and the step is undone. Without CUDA the same protocol
runs with the calling thread as the GPU (`StandInHandoff`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .memory_model import HOST_PLACEMENTS

if TYPE_CHECKING:
    from .step_plan import StepPlan

HANDOFF_TIMEOUT_S = 10.0
"""Bound of one GPU wait for the CPU's answer (a layer's CPU attention takes milliseconds)."""
HANDOFF_SPIN_US = 2000.0
"""The hand-off worker spins this long after an answer before it backs off to sleeps: longer than
a layer's GPU part, so the next layer's request is seen at once (it has a core of its own)."""


@dataclass(eq=False)
class PendingLayer:
    """A layer `HybridAttention.run_begin` began; `run_end` finishes it. `out`: the layer's output
    when run_begin ran it whole; else `state` holds the GPU's side (o, lse; lse None: o is the
    output) until the CPU's answer merges in."""
    layer: int
    out: Optional[torch.Tensor] = None
    state: Optional[tuple] = None
    dtype: Optional[torch.dtype] = None
    need: Optional[torch.Tensor] = None
    """Head-pages of the layer's host part (a device scalar; host placements in whole steps)."""
    joined: Optional[object] = None
    """A CUDA event after the layer's back part when it ran on the runtime's back stream: the
    caller's stream waits for it in run_end."""


class WholeStep:
    """Whole decode steps in the caller's CUDA graph (module docstring)."""

    def _plan_whole(self, step: StepPlan) -> tuple:
        """Bind `step` to its shape's static buffers and open its hand-off step; its graph key."""
        if self.store is not None and self.store.device.type != self.device.type:
            raise ValueError("plan(whole_step=True) needs the summaries on the device (they are "
                             f"in host memory: summary_location={self.cfg.summary_location!r}, or "
                             "auto found no room); plan without whole_step")
        if not self.selection_captures:
            raise ValueError(f"plan(whole_step=True): flow {self.cfg.flow!r} has no fused indexer "
                             "kernel, so its selection synchronises and cannot be captured; plan "
                             "without whole_step")
        key, static = self._whole_sets.bind_whole(step)
        step.whole, step.static = True, static
        if self.placement in HOST_PLACEMENTS:
            self._handoff_channel().begin_step(self._handoff_ch)
        return key

    def _handoff_channel(self):
        """The hand-off protocol's driver (made on first use: it starts the worker thread)."""
        if self._whole_handoff is None:
            self._whole_handoff = self._new_handoff([self._whole_cpu_part])
        return self._whole_handoff

    def _new_handoff(self, cpu_parts: list):
        """A hand-off driver for this runtime's device with one channel per CPU part (several:
        runtimes sharing one worker, `micro_batches`); compiles the CPU kernels first and gives
        them the cores left."""
        from . import handoff
        from .. import cpu_kernels
        cpu_kernels.warmup()                # compile before the first step's bounded waits
        # Cores: one for the thread driving the GPU (its synchronisation spins), one for the
        # hand-off worker's poll; the CPU attention gets the rest unless cfg sets it.
        cpu_kernels.set_cpu_threads(self._cpu_threads(reserved=2))
        if self.device.type == "cuda":
            return handoff.GraphHandoff(self.num_layers, cpu_parts, device=self.device,
                                        timeout_s=HANDOFF_TIMEOUT_S, spin_us=HANDOFF_SPIN_US)
        return handoff.StandInHandoff(self.num_layers, cpu_parts, timeout_s=HANDOFF_TIMEOUT_S)

    def _begin_whole(self, step: StepPlan, layer: int, q, k_new, v_new, sel=None) -> PendingLayer:
        """One layer of a whole step over its static buffers up to the GPU's wait for the CPU (a
        host placement's; other layers run whole); no synchronisation."""
        static = step.static
        s = static.step
        static.split = not (self.placement == "gpu" or (self.placement == "dense" and sel is None))
        static.given = sel is not None
        if s.shape == "cached" or not static.split:     # a whole layer: no hand-off
            self._append(s, layer, k_new, v_new)
            out = self.attend_whole(s, layer, q, sel)
            if len(out) > 1:                # a given selection: counted on the device
                s.counts += out[1]
            pending = PendingLayer(layer, out=None, state=(out[0], None))
        else:
            pending = self._split_whole_begin(s, static, layer, q, k_new, v_new, sel)
        if self.store is not None and s.sum_rows is not None:
            self.store.compute_rows(layer, self.kv.device_pool.k[layer], s.write_pages, s.sum_rows)
        pending.dtype = q.dtype
        return pending

    def _end_whole(self, step: StepPlan, pending: PendingLayer) -> torch.Tensor:
        """The rest of a layer `_begin_whole` began: wait for the CPU's answer, merge; the layer
        counts as run (the step's device counter)."""
        static = step.static
        o, lse = pending.state
        if pending.joined is not None:
            torch.cuda.current_stream().wait_event(pending.joined)
        if lse is not None:
            o = self._split_whole_end(static, pending.layer, o, lse, pending.need)
        static.ran += 1
        return o if lse is None else o.to(pending.dtype)

    def _split_whole_begin(self, s: StepPlan, static, layer: int, q, k_new, v_new,
                           sel) -> PendingLayer:
        """A host-placement layer (or a given selection) with the hand-off on the device: the
        front, the host's share published to the CPU worker, the back (fetch, the GPU's own
        attention); the GPU's state waits in the returned layer for the CPU's."""
        gsel, table, src, dst, counts, q_host, sel_host, host_n = self._front(
            s, layer, q, k_new, v_new, sel, static.pinned, whole=True)
        s.counts += counts
        host = self.placement != "gpu"
        if host:
            io = static.cpu_io
            io["q"], io["sel"] = q_host, sel_host
            B, hq, D = q.shape
            io["o"] = static.pinned.get("o_cpu", (B, hq, D), torch.float32)
            io["lse"] = static.pinned.get("lse_cpu", (B, hq), torch.float32)
            self._whole_handoff.publish(layer, self._handoff_ch, need=host_n)
        side = self._back_stream
        if side is None or not torch.cuda.is_current_stream_capturing():
            o, lse = self._back(s, layer, q, gsel, table, src, dst)
            return PendingLayer(layer, out=None, state=(o, lse), need=host_n)
        # captured only: forked from the caller's stream and joined in run_end, inside the graph.
        # The front's tensors the back reads are marked used by the side stream: the allocator
        # then keeps their blocks until the capture ends, so no later node of the caller's
        # stream is given (and writes) memory the side stream still reads.
        side.wait_stream(torch.cuda.current_stream())
        for t in (q, gsel, table, src, dst):
            if t is not None:
                t.record_stream(side)
        with torch.cuda.stream(side):
            o, lse = self._back(s, layer, q, gsel, table, src, dst)
            joined = torch.cuda.Event()
            joined.record(side)
        return PendingLayer(layer, out=None, state=(o, lse), need=host_n, joined=joined)

    def _split_whole_end(self, static, layer: int, o, lse, need=None) -> torch.Tensor:
        """Wait (bounded, on the device) for the CPU's state of `layer`, and merge it into the
        GPU's (o, lse); without a host part, the GPU's o. A layer whose host part is empty (`need`
        0 on the device) does not wait: the worker answers it without the CPU part, and the
        pinned outputs (another layer's) are masked out of the merge."""
        if self.placement == "gpu":
            return o
        self._whole_handoff.wait(layer, self._handoff_ch, need=need)
        io = static.cpu_io
        o_c = io["o"].to(self.device, non_blocking=True)
        lse_c = io["lse"].to(self.device, non_blocking=True)
        if need is not None:
            empty = need == 0
            o_c.masked_fill_(empty, 0.0)
            lse_c.masked_fill_(empty, float("-inf"))
        o, _ = self._gpu.merge(o, lse, o_c, lse_c)
        return o

    def _whole_cpu_part(self, layer: int, _step_no: int) -> None:
        """On the hand-off worker: attend the host part of `layer`'s selection of the bound whole
        step into the pinned output buffers (an empty selection: o = 0, lse = -inf)."""
        t0 = time.perf_counter()
        static = self._step.static
        io, s = static.cpu_io, static.step
        try:
            self._cpu_part_into(layer, static, io, s)
        finally:
            static.cpu_s += time.perf_counter() - t0

    def _cpu_part_into(self, layer: int, static, io: dict, s: StepPlan) -> None:
        with torch.inference_mode():        # the buffers are inference tensors (this thread's mode)
            n = int(np.count_nonzero(io["sel"].numpy() >= 0))    # NumPy: no torch thread pool
            static.cpu_pages += n
            if n == 0:                      # NumPy fills: a torch op here would wake torch's
                io["o"].numpy().fill(0.0)   # own thread pool beside the CPU kernels' threads
                io["lse"].numpy().fill(-np.inf)
                return
            t0 = time.perf_counter()
            o, lse = self._cpu_state(layer, io["q"], io["sel"], s.host_table, s.lens_cpu,
                                     out=(io["o"], io["lse"]))
            static.cpu_kernel_s += time.perf_counter() - t0
            static.cpu_calls += 1
            if o.data_ptr() != io["o"].data_ptr():
                io["o"].copy_(o)
                io["lse"].copy_(lse)

    def finish_step(self, wait: bool = True) -> None:
        """End a step planned with `plan(rids, whole_step=True)` after its layers ran (a replay, or
        run() of every layer): one synchronisation reads its counters and NaN flags; a failed CPU
        part (its exception re-raised), a hand-off time-out, or layers that did not run fail the
        step, which is then undone (every request as before plan()).

        wait=False returns at once and leaves that to the next call that needs the step done:
        `plan()` does its own host work first and completes the step just before it binds the
        new step's buffers (so the host prepares step t + 1 while the GPU runs step t); also
        `complete_step()`, `stats()`, request changes and `close()`. A failed step then raises
        from that call, with the step (and a `plan()`'s new step) undone."""
        step = self._step
        if step is None or not step.whole or step.finished or step.deferred:
            raise ValueError("finish_step() ends a step planned with plan(rids, whole_step=True) "
                             "whose layers ran; there is none open")
        if wait:
            self._finish_whole(step)
        else:
            step.deferred = True

    def complete_step(self) -> None:
        """Complete a step ended with `finish_step(wait=False)` (one synchronisation; its failure
        raises here, the step undone); nothing to do when there is none."""
        step = self._step
        if step is not None and step.awaiting:
            self._finish_whole(step)

    def _finish_whole(self, step: StepPlan, undo: bool = True) -> None:
        """`finish_step`'s work: synchronise, validate, count. A failure is raised after the step
        is undone, or with undo=False kept in `step.failed` and raised with nothing undone (the
        caller undoes what it did since, then the step: `plan()`)."""
        with torch.inference_mode():
            static = step.static
            s = static.step
            try:
                self._sleep_until_done()
                read = torch.cat([s.counts, s.nonfinite.to(torch.int64), static.ran]).tolist()
                if read[-1] != self.num_layers:       # (its hand-off step is abandoned)
                    raise RuntimeError(
                        f"finish_step(): {read[-1]} of {self.num_layers} layers of the step ran "
                        "(replay the graph captured for the key plan() returned, or run() every "
                        "layer, before finish_step()); the step is undone")
                if self.placement in HOST_PLACEMENTS:
                    # a CPU part's exception, re-raised
                    self._whole_handoff.finish_step(self._handoff_ch)
            except BaseException as exc:
                if not undo:
                    step.failed = exc
                    raise
                self._abort(step)
                raise
            step.next_layer = step.fronts = self.num_layers
            step.finished = True
            c = step.counters
            if step.shape == "cached" and static.given is False:   # the flow's selection
                c["gpu_pages"] += step.resident_pages * self.num_layers
                c["cache_hits"] += step.cached_hits * self.num_layers
            elif not static.split and step.shape != "cached" and static.given is False:
                # dense / gpu with the flow's selection: plan() counted
                c["gpu_pages"] += step.resident_pages * self.num_layers
            c["cpu_pages"] += static.cpu_pages
            c["cpu_part_s"] = static.cpu_s      # the hand-off worker's time in the CPU parts
            c["cpu_kernel_s"] += static.cpu_kernel_s    # of which in the attention kernel's calls
            c["cpu_calls"] += static.cpu_calls          # layers whose host part was not empty
            self._end_step(step, read[:-1])

    def _sleep_until_done(self) -> None:
        """Host placements on CUDA: wait for the step's GPU work on a blocking event, so this
        thread sleeps instead of spinning in the copy's synchronisation and leaves its core to the
        CPU parts still running (one wake-up a step, not a layer)."""
        if self.placement in HOST_PLACEMENTS and self.device.type == "cuda":
            if self._step_done is None:
                self._step_done = torch.cuda.Event(blocking=True)
            self._step_done.record()
            self._step_done.synchronize()

    def _settle_whole(self, step: StepPlan) -> None:
        """Before undoing a whole step: wait for its work, count the layers whose page-cache
        checkpoints are this step's (`step.fronts`: those a replay ran, by the device counter, or
        those run() began eagerly, the one that failed included), and close its hand-off step."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ran = int(step.static.ran.item())
        step.fronts = min(self.num_layers, max(step.fronts, ran))
        if self._whole_handoff is not None:     # its layers not published are passed over
            self._whole_handoff.abandon_step(self._handoff_ch)
