"""`DecodeGraphs`: the hooks of SGLang's decode CUDA graphs (a mixin of `VortexHybridBackend`).

SGLang's decode graph runner (`full` backend) captures one graph per batch-size bucket and replays
it with the batch padded to the bucket, real rows first. The hooks map that onto the runtime's
fixed-shape whole steps (`runtime.fixed_shape`): every bucket is `FixedShape(bucket, pages of
SGLang's context length)`, so every step of a bucket has the key captured for it.

- `init_cuda_graph_state`: the tables' width (SGLang's other graph kinds are refused earlier,
  `config.check_server_args`);
- capture: `init_forward_metadata_out_graph(in_capture=True)` plans a step of padding only for the
  bucket; `on_after_cuda_graph_warmup` plans it again after each warm-up run, so the captured
  forward records layers 0..L-1 (the CPU hand-off included) over that bucket's static buffers;
- replay: `init_forward_metadata_out_graph` over SGLang's padded view of the batch syncs the real
  rows, plans them (the dummy rows, and a row the runtime refused, are padding rows) and checks
  the key against the captured one (a differing key raises before the replay);
- the replayed step is finished (`HybridAttention.finish_step`, one synchronisation) at the
  backend's next call, before anything else; when that call is the next replay, without waiting
  (`finish_step(wait=False)`): the runtime's `plan()` builds the new step's tables while the step
  runs and completes it before binding. A step that fails is undone and its requests are marked
  for the scheduler to abort (`sizing.FAILED`), never the engine; found by the next replay's
  `plan()`, that batch is planned again without them.
"""

from __future__ import annotations

import logging
from typing import Optional

from ...runtime import FixedShape
from . import sizing

log = logging.getLogger(__name__)


class DecodeGraphs:
    """SGLang's decode-graph hooks over fixed-shape whole steps (module docstring)."""

    def _init_graphs(self) -> None:
        self.graph_keys: dict[int, tuple] = {}
        """Bucket (padded batch size) -> the runtime key captured for it."""
        self._graph_pages = 0                       # FixedShape.max_pages of every bucket
        self._capture: Optional[FixedShape] = None  # the bucket being captured
        self._open_graph_step: Optional[list] = None
        """A replayed step's (row, generation)s, until it is finished at the next call."""
        self._deferred_keys: Optional[list] = None
        """Those of a step ended with finish_step(wait=False), until the runtime completes it."""

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Before the captures: every bucket's tables are as wide as SGLang's longest request
        (its request pool's context length) in pages."""
        context = int(self.req_to_token_pool.req_to_token.shape[1])
        self._graph_pages = -(-context // self.cfg.page_size)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def _graph_shape(self, batch: int) -> FixedShape:
        return FixedShape(batch, self._graph_pages, int(self.req_to_token_pool.size))

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Outside the graph, before a capture (`in_capture`: a step of padding only for the
        bucket) or a replay (the batch's real rows planned, padded to the bucket); the runtime's
        key must be the one captured for the bucket. A replay's step before is ended without
        waiting: the runtime's plan() builds this step's tables while it runs and completes it
        before binding (a failure of it aborts its requests, and this batch is planned again
        without them)."""
        self._end_graph_step(defer=not in_capture)
        self._decode_live = None                    # graphs: every row runs, padding included
        bs = int(forward_batch.batch_size)
        shape = self._graph_shape(bs)
        if in_capture:
            self._capture = shape
            self.graph_keys[bs] = self.runtime.plan([], whole_step=True, fixed=shape)
            return
        self.requests.drop_freed()
        self._capture = None
        real = bs - int(getattr(forward_batch, "num_padding", 0) or 0)
        rows, gens = self._rows(forward_batch, decode=True)   # rows [:real] (padding after)
        lens = (forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None
                else forward_batch.seq_lens).tolist()
        rids, keys = [], []
        for i in range(real):
            if (rows[i], gens[i]) in sizing.FAILED:
                rids.append(None)                   # refused by the runtime: a padding row
                continue
            rids.append(self.requests.sync(rows[i], gens[i], lens[i] - 1, self._reader(rows[i])))
            keys.append((rows[i], gens[i]))
        try:
            key = self.runtime.plan(rids, whole_step=True, fixed=shape)
        except Exception as exc:
            before, self._deferred_keys = self._deferred_keys, None
            if before is None or self.runtime.deferred_failure is None:
                raise
            self._fail_rows(before, exc)            # the step before failed and was undone
            rids = [None if (rows[i], gens[i]) in sizing.FAILED else rid
                    for i, rid in enumerate(rids)]
            keys = [k for k in keys if k not in sizing.FAILED]
            key = self.runtime.plan(rids, whole_step=True, fixed=shape)
        self._deferred_keys = None
        if key != self.graph_keys.get(bs):
            self.runtime.cancel_step()
            raise RuntimeError(f"vortex_hybrid: the runtime's step key {key} for batch size {bs} "
                               f"differs from the one captured ({self.graph_keys.get(bs)}); the "
                               "captured graph would read other buffers")
        self._open_graph_step = keys

    def on_after_cuda_graph_warmup(self):
        """After each warm-up run of a capture: the bucket's padding step planned again, so the
        next run (the capture) starts at layer 0 over the same static buffers."""
        if self._capture is not None:
            self.runtime.plan([], whole_step=True, fixed=self._capture)

    def _end_graph_step(self, defer: bool = False) -> None:
        """Finish a replayed step (one sync: its counters, NaN flags, the CPU side's errors), or
        drop a capture's padding step; a step that failed aborts its requests. defer: end it
        with finish_step(wait=False) (the next replay's plan() completes it); otherwise a step
        ended so earlier is completed here."""
        keys, self._open_graph_step = self._open_graph_step, None
        if self._capture is not None:
            self._capture = None
            self.runtime.cancel_step()
        if keys is not None:                        # the step just replayed
            if defer:
                self.runtime.finish_step(wait=False)
                self._deferred_keys = keys
                return
            end = self.runtime.finish_step
        elif self._deferred_keys is not None and not defer:     # one ended without waiting
            keys, self._deferred_keys = self._deferred_keys, None
            end = self.runtime.complete_step
        else:
            return
        try:
            end()
        except Exception as exc:                    # the step is undone: its requests end
            self._fail_rows(keys, exc)

    def _fail_rows(self, keys: list, exc: BaseException) -> None:
        """A failed (and undone) step's requests: marked for the scheduler to abort, dropped."""
        log.error("vortex_hybrid: a decode step in SGLang's CUDA graph failed, aborting its "
                  "%d requests: %s", len(keys), exc)
        for row, gen in keys:
            sizing.FAILED[(row, gen)] = f"decode step failed: {exc}"
            self.requests.drop(row)
