"""`VortexHybridBackend`: SGLang's `AttentionBackend` over one `HybridAttention`.

SGLang drives it per forward batch: `init_forward_metadata(batch)` once, then each layer's
`forward_extend` or `forward_decode` in order. How the calls map onto the runtime:

- **one copy of the KV** (`sizing`): with the plugin, SGLang's pool holds slot ids only and its
  `max_total_num_tokens` is the runtime's capacity; prefill (extend) runs SGLang's own dense
  backend (`triton` on CUDA, `torch_native` elsewhere; `VORTEX_HYBRID_SGLANG_PREFILL` overrides)
  over a small staging area, each request's tokens placed there per batch (a chunked prefill's
  earlier chunks read back from the runtime); after the last layer the new tokens are synced into
  the runtime (`RequestMap.sync`), which fills the summaries and, in host placements, the pinned
  host copies. A row the runtime refuses (`OutOfPagesError`) is marked for the scheduler to abort.
  A runner built without the plugin's sizing keeps SGLang's pool as is: prefill runs over it and
  decode writes its token there too (the KV twice; tests only).
- **decode**: `init_forward_metadata` syncs the rows (a no-op check in the steady state) and calls
  `HybridAttention.plan` once for all layers; each layer returns `HybridAttention.run`.
- **decode in SGLang's CUDA graphs** (decode backend `full`, SGLang's default for decode): one
  graph per batch-size bucket over the runtime's fixed-shape whole steps (`decode_graphs`).
- **requests**: SGLang's request-pool rows recycle; `RequestMap` ties a runtime request to a row
  and its generation, and the pool's `free` (wrapped on this backend's pool object) drops finished
  requests between steps.

Pages: the runtime's page size equals SGLang's `--page-size` (checked at start-up), so SGLang's
page count of a request is the runtime's.

Not supported (refused at start-up by `config.check_server_args` / `check_model`, and here when a
layer shows it): SGLang's breakable and prefill CUDA graphs (`--disable-prefill-cuda-graph`), mixed
prefill+decode batches, speculative decoding, tensor
/ pipeline / data parallelism, sliding windows, logit capping, scalings other than head_dim ** -0.5,
cross-attention.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ...config import HybridConfig
from ...runtime.hybrid_attention import HybridAttention
from ...runtime.memory_model import HOST_PLACEMENTS, TAIL_PAGES
from ...kv.errors import OutOfPagesError
from . import sizing
from .config import ConfigError, check_graph_flow, check_model, cuda_graph_phases
from .decode_graphs import DecodeGraphs
from .request_map import RequestMap

log = logging.getLogger(__name__)


SLOTS = 4096
"""GPU cache slots when `gpu_cache_pages` is None: SGLang keeps its own KV pool in HBM beside the
runtime's, so the backend does not give the cache the rest of HBM."""


def pool_sizes(cfg: HybridConfig, tokens: int, requests: int) -> dict:
    """The runtime's device_pages / host_pages for an SGLang KV pool of `tokens` token slots shared
    by up to `requests` requests: room for every page of that pool in HBM (`dense`, `gpu`), or in
    pinned host memory (host placements; `cfg.host_memory_gib` of it instead when set), with the
    device pool holding the requests' tail pages, prefill chunks and the GPU cache slots."""
    pages = tokens // cfg.page_size + 2 * requests + 8
    if cfg.placement not in HOST_PLACEMENTS:
        return {"device_pages": pages, "host_pages": 0}
    slots = 0
    if cfg.placement in ("offload", "hybrid"):
        slots = SLOTS if cfg.gpu_cache_pages is None else cfg.gpu_cache_pages
    out = {"device_pages": TAIL_PAGES + 2 * requests + slots, "host_pages": pages}
    if cfg.host_memory_gib is not None:
        out.pop("host_pages")                          # HybridAttention sizes it from the cap
    return out


PREFILL_ENV = "VORTEX_HYBRID_SGLANG_PREFILL"
"""Overrides the prefill backend: `triton` or `torch_native` (default: SGLang's `triton` backend on
CUDA, the one SGLang itself defaults to there, `torch_native` elsewhere)."""

PREFILL_TIMES_ENV = "VORTEX_HYBRID_PREFILL_TIMES"
"""Set to 1: log each extend batch's phases (staging, the model's forward with the restaging of
earlier chunks inside it, the sync into the runtime), each timed after a device synchronisation
(so the prefill runs slower while it is on). Set to `profile`: the same, and the sync into the
runtime of the first PROFILED_SYNCS extend batches also runs under `torch.profiler`, whose top
ops (by device time on CUDA, else host time) are logged after the batch's line."""
PROFILED_SYNCS = 3
PROFILE_ROWS = 15


class _PrefillTimes:
    """Wall times of one extend batch's phases, each phase ended by a device synchronisation;
    `restage` (a context manager) adds a span inside a phase to the restaging time. `profile`:
    PREFILL_TIMES_ENV asked for the profiler too."""

    def __init__(self, device: torch.device, profile: bool = False) -> None:
        self.device, self.marks, self.read_back, self.restage_s = device, [], 0, 0.0
        self.profile = profile

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mark(self, name: str) -> None:
        self._sync()
        self.marks.append((name, time.perf_counter()))

    @contextlib.contextmanager
    def restage(self):
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.restage_s += time.perf_counter() - t0

    def line(self, rows: int, new_tokens: int) -> str:
        parts = [f"{b[0]} {1e3 * (b[1] - a[1]):.1f} ms" for a, b in zip(self.marks, self.marks[1:])]
        if self.read_back:
            parts = [p + (f" (restaging earlier chunks {1e3 * self.restage_s:.1f} ms of it)"
                          if p.startswith("model ") else "") for p in parts]
        return (f"vortex_hybrid prefill batch: {rows} rows, {new_tokens} new tokens, "
                f"{self.read_back} read back from the runtime: " + ", ".join(parts))


def _profiled(fn, device: torch.device) -> str:
    """Run fn() under torch.profiler; its top PROFILE_ROWS ops as a table (by self device time on
    CUDA, else self host time). A profiler that cannot start (another one running) leaves fn()
    to run unprofiled, and the table says why."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts)
    try:
        prof.__enter__()
    except Exception as exc:                            # noqa: BLE001 - reported, fn still runs
        fn()
        return f"(not profiled: {type(exc).__name__}: {exc})"
    try:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        prof.__exit__(None, None, None)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=PROFILE_ROWS)


def _prefill_backend(model_runner, device: torch.device):
    """SGLang's own backend that runs the dense prefill (extend) over its KV pool."""
    name = os.environ.get(PREFILL_ENV) or ("triton" if device.type == "cuda" else "torch_native")
    if name == "triton":
        from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
        return TritonAttnBackend(model_runner)
    if name == "torch_native":
        return TorchNativeAttnBackend(model_runner)
    raise ConfigError(f"{PREFILL_ENV}={name!r} must be 'triton' or 'torch_native'")


class VortexHybridBackend(DecodeGraphs, AttentionBackend):
    """SGLang attention backend `vortex_hybrid` (module docstring)."""

    def __init__(self, model_runner, cfg: HybridConfig) -> None:
        super().__init__()
        mc = model_runner.model_config
        check_model(mc)
        self.device = torch.device(model_runner.device)
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.num_layers = int(mc.num_hidden_layers)
        self.num_q_heads, self.num_kv_heads = int(mc.num_attention_heads), int(mc.num_key_value_heads)
        self.head_dim = int(mc.head_dim)
        self.staging = None
        """The prefill staging area when the runtime holds the only copy of the KV (SGLang's pool
        sized by the plugin: `sizing`); None when SGLang's pool holds the KV too (a runner built
        without the plugin's sizing: prefill then runs over SGLang's pool)."""
        server_args = getattr(model_runner, "server_args", None)
        prefill_runner = model_runner
        if sizing.holds_no_kv(self.token_to_kv_pool):
            stash = sizing.planned(server_args)
            if stash is None:
                raise ConfigError("SGLang's KV pool holds no K/V (NoOpMHATokenToKVPool) but the "
                                  "plugin did not size it; load the plugin before the engine "
                                  "starts (sglang.srt.plugins.load_plugins())")
            mem = stash[1]
            sizes = {"device_pages": mem.device_pages, "host_pages": mem.host_pages}
            self.staging = sizing.Staging(model_runner, *sizing.staging_slots(
                server_args, int(mc.context_len), int(self.req_to_token_pool.size),
                cfg.page_size))
            prefill_runner = self.staging.runner(model_runner)
        else:
            sizes = pool_sizes(cfg, int(model_runner.max_total_num_tokens),
                               int(self.req_to_token_pool.size))
        self.dense = _prefill_backend(prefill_runner, self.device)
        self.runtime = HybridAttention(cfg, self.num_layers, self.num_q_heads, self.num_kv_heads,
                                       self.head_dim, device=self.device, **sizes)
        try:                                   # the runtime's own answer, once it is built
            check_graph_flow(self.runtime.selection_captures, cfg.flow,
                             cuda_graph_phases(server_args), self.device.type)
        except ConfigError:
            self.runtime.close()
            raise
        self.requests = RequestMap(self.runtime)
        self._checked: set[int] = set()
        self._extend_batch = None              # the extend batch as the dense backend sees it
        self._restage: list = []               # (runtime request, row, start): earlier chunks
        self._times = None                     # an extend batch's phase times (PREFILL_TIMES_ENV)
        self._profiled_syncs = 0               # extend batches whose sync ran under the profiler
        self._decode_live = None               # decode: batch positions the runtime serves
        self.device_row_reads = 0              # batches whose rows were read from the device
        self._init_graphs()
        self._watch_frees(self.req_to_token_pool)
        cap = self.runtime.capacity()
        log.info(sizing.describe(cfg, self.runtime.memory,
                                 self.staging.bytes if self.staging is not None else 0,
                                 cap["tokens"], cap["requests"]))
        log.debug("vortex_hybrid: %s over %d layers, %d/%d heads, head_dim %d; pools %s",
                  cfg, self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim, sizes)

    @property
    def cfg(self) -> HybridConfig:
        return self.runtime.cfg

    def _watch_frees(self, pool) -> None:
        """Report every row the pool frees to the request map: the pool object's own `free_rows`
        (sglang 0.5.21: every row goes back through it) or `free(req)` (0.5.17), wrapped on this
        instance; SGLang's class is untouched."""
        requests = self.requests

        def forget(row: int) -> None:
            requests.freed(row)
            for key in [key for key in sizing.FAILED if key[0] == row]:
                del sizing.FAILED[key]

        if hasattr(pool, "free_rows"):
            free_rows = pool.free_rows

            def watched_free_rows(indices, *args, **kwargs):
                out = free_rows(indices, *args, **kwargs)
                for row in indices:
                    forget(int(row))
                return out

            pool.free_rows = watched_free_rows
            return
        free = pool.free

        def watched_free(req, *args, **kwargs):
            row = req if isinstance(req, int) else getattr(req, "req_pool_idx", None)
            out = free(req, *args, **kwargs)
            if row is not None:
                forget(row)
            return out

        pool.free = watched_free

    # ---- per batch ------------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch) -> None:
        """Once per forward batch, before layer 0: drop freed requests; for an extend batch, place
        its tokens in the staging area (when there is one) and prepare the dense backend; for a
        decode batch, sync its rows and plan the runtime's step (once for all layers)."""
        mode = forward_batch.forward_mode
        if mode.is_mixed() or mode.is_target_verify() or mode.is_draft_extend_v2():
            raise ConfigError(f"forward mode {mode.name} (mixed batches / speculative decoding) "
                              "is not supported; run without --enable-mixed-chunk and "
                              "speculative decoding")
        self._end_graph_step()
        self.requests.drop_freed()
        if mode.is_extend():
            timing = os.environ.get(PREFILL_TIMES_ENV)
            if timing in ("1", "profile"):
                self._times = _PrefillTimes(self.device, profile=timing == "profile")
                self._times.mark("start")
            batch = forward_batch if self.staging is None else self._stage(forward_batch)
            if self._times is not None:
                self._times.mark("staging")
            self._extend_batch = batch
            self.dense.init_forward_metadata(batch)
        elif mode.is_decode():
            lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None \
                else forward_batch.seq_lens
            rows, gens = self._rows(forward_batch, decode=True)
            live = [i for i, key in enumerate(zip(rows, gens)) if key not in sizing.FAILED]
            self._decode_live = None if len(live) == len(rows) else live
            if live:
                lens = lens.tolist()
                rids = [self.requests.sync(rows[i], gens[i], lens[i] - 1, self._reader(rows[i]))
                        for i in live]
                self.runtime.plan(rids)

    def _rows(self, forward_batch, decode: bool = False) -> tuple[list[int], list[int]]:
        """The batch's request-pool rows and their generations. A decode batch whose requests
        (SGLang's `rids`, host strings) were all seen in an extend batch, with their rows' host
        generations unchanged since, takes its rows from there: reading `req_pool_indices` (a
        device tensor) would wait for the step still running on the GPU, which the backend's
        deferred step end lets the next step's planning overlap. Any other batch reads the device
        tensor and records its requests' rows (`device_row_reads` counts those reads)."""
        generation = getattr(self.req_to_token_pool, "req_generation", None)
        rids = getattr(forward_batch, "rids", None)
        real = int(forward_batch.batch_size) - int(getattr(forward_batch, "num_padding", 0) or 0)
        if decode and generation is not None and rids and len(rids) == real:
            known = self.requests.known_rows(rids, generation)
            if known is not None:
                return known
        self.device_row_reads += 1
        rows = forward_batch.req_pool_indices.tolist()
        gens = generation[rows].tolist() if generation is not None else [0] * len(rows)
        if rids and generation is not None:
            self.requests.record(rids, rows[:len(rids)], gens[:len(rids)], generation)
        return rows, gens

    def _stage(self, forward_batch):
        """The extend batch as the dense backend sees it over the staging area: every row's tokens
        [0, seq_len) placed there (the earlier chunks of a chunked prefill are read back from the
        runtime layer by layer, `_restage_layer`), the new tokens' slots as `out_cache_loc`."""
        staging = self.staging
        rows, gens = self._rows(forward_batch)
        ends = forward_batch.seq_lens.tolist()
        starts = [e - n for e, n in zip(ends, forward_batch.extend_seq_lens.tolist())]
        new = staging.place(rows, starts, ends)
        self._restage = []
        for row, gen, start in zip(rows, gens, starts):
            if start == 0 or (row, gen) in sizing.FAILED:
                continue
            rid = self.requests.holding(row, gen, start)
            if rid is None:
                sizing.FAILED[(row, gen)] = (
                    f"request-pool row {row} starts its extend at token {start} but the runtime "
                    "holds no such prefix (a prefix-cache hit: run with --disable-radix-cache)")
                continue
            self._restage.append((rid, row, start))
            if self._times is not None:
                self._times.read_back += start
        batch = copy.copy(forward_batch)
        batch.out_cache_loc = new.to(forward_batch.out_cache_loc.device)
        batch.req_to_token_pool = staging.req_to_token_pool
        batch.token_to_kv_pool = staging.pool
        return batch

    def _sync_extend(self, forward_batch) -> None:
        """After an extend batch's last layer: each row's new tokens into the runtime. A row the
        runtime cannot take (`OutOfPagesError`) is marked in `sizing.FAILED` (the scheduler aborts
        it) and its runtime request dropped; the other rows go on."""
        rows, gens = self._rows(forward_batch)
        for row, gen, n in zip(rows, gens, forward_batch.seq_lens.tolist()):
            if (row, gen) in sizing.FAILED:
                continue
            try:
                self.requests.sync(row, gen, n, self._reader(row))
            except OutOfPagesError as exc:
                sizing.FAILED[(row, gen)] = str(exc)
                self.requests.drop(row)
                log.warning("vortex_hybrid: the runtime refused request-pool row %d's %d tokens: "
                            "%s", row, n, exc)

    def _reader(self, row: int):
        """Tokens [start, end) of the request in pool row `row`, every layer, from the pool the
        prefill wrote (the staging area, or SGLang's pool): k, v [num_layers, end - start, Hkv,
        D]."""
        rtt = (self.staging.req_to_token_pool if self.staging is not None
               else self.req_to_token_pool).req_to_token
        pool = self.staging.pool if self.staging is not None else self.token_to_kv_pool

        def read(start: int, end: int):
            if self.staging is not None and self._extend_batch is None:
                raise RuntimeError(f"request-pool row {row}: the runtime lacks its tokens "
                                   f"[{start}, {end}) at a decode step, and only the runtime "
                                   "holds the KV")
            slots = rtt[row, start:end].to(torch.int64)
            k = torch.stack([pool.get_key_buffer(i).index_select(0, slots)
                             for i in range(self.num_layers)])
            v = torch.stack([pool.get_value_buffer(i).index_select(0, slots)
                             for i in range(self.num_layers)])
            return k, v
        return read

    # ---- per layer ------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        """Dense prefill over the staging area (or SGLang's pool); after the last layer, the
        batch's new tokens go into the runtime. q [T, Hq * D] (or [T, Hq, D]); out [T, Hq * D]."""
        self._check_layer(layer)
        batch = self._extend_batch if self._extend_batch is not None else forward_batch
        if self._restage:
            self._restage_layer(layer.layer_id)
        o = self.dense.forward_extend(q, k, v, layer, batch, save_kv_cache)
        if layer.layer_id == self.num_layers - 1:
            self._restage = []
            times, self._times = self._times, None
            if times is not None:
                times.mark("model")
            table = None
            if times is not None and times.profile and self._profiled_syncs < PROFILED_SYNCS:
                self._profiled_syncs += 1
                table = _profiled(lambda: self._sync_extend(forward_batch), self.device)
            else:
                self._sync_extend(forward_batch)
            self._extend_batch = None
            if times is not None:
                times.mark("sync into the runtime")
                lens = getattr(forward_batch, "extend_seq_lens_cpu", None)
                new = sum(lens) if lens is not None else int(forward_batch.extend_seq_lens.sum())
                log.info(times.line(int(forward_batch.batch_size), int(new)))
                if table is not None:
                    log.info("vortex_hybrid prefill sync into the runtime, top ops:\n%s", table)
        return o

    def _restage_layer(self, layer: int) -> None:
        """One layer's earlier chunks of the batch's chunked requests, read back from the runtime
        into the staging area's prefix region (which every layer shares), before it attends."""
        staging = self.staging
        device = staging.pool.k_buffer[layer].device
        timed = self._times.restage() if self._times is not None else contextlib.nullcontext()
        with timed:
            for rid, row, start in self._restage:
                k, v = self.runtime.kv.read_tokens(rid, 0, start, device, first_layer=layer,
                                                   end_layer=layer + 1)
                staging.write_layer(layer, staging.slots(row, 0, start), k[0], v[0])

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        """One token per request: the runtime's layer step (and, when SGLang's pool holds the KV
        too, the token written there). Rows the runtime refused (aborted by the scheduler) get
        zeros. q [B, Hq * D], k / v [B, Hkv * D] (or head-split); out [B, Hq * D] in q's dtype."""
        self._check_layer(layer)
        if k is None or v is None:
            raise ConfigError(f"layer {layer.layer_id} hands no new K/V to attention (KV shared "
                              "across layers), which the hybrid runtime does not serve")
        if save_kv_cache and self.staging is None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc,
                                                                  None), k, v)
        B, live = forward_batch.batch_size, self._decode_live
        q = q.reshape(B, self.num_q_heads, self.head_dim)
        k = k.reshape(B, self.num_kv_heads, self.head_dim)
        v = v.reshape(B, self.num_kv_heads, self.head_dim)
        if live is None:
            o = self.runtime.run(layer.layer_id, q, k, v)
        else:
            o = torch.zeros_like(q)
            if live:
                idx = torch.tensor(live, device=q.device)
                o[idx] = self.runtime.run(layer.layer_id, q[idx], k[idx], v[idx]).to(q.dtype)
        return o.reshape(B, self.num_q_heads * self.head_dim)

    def _check_layer(self, layer) -> None:
        """What SGLang's layer asks of attention, checked once per layer."""
        if layer.layer_id in self._checked:
            return
        D = self.head_dim
        problems = []
        if not math.isclose(float(layer.scaling), D ** -0.5, rel_tol=1e-5):
            problems.append(f"scaling {layer.scaling} is not head_dim ** -0.5 = {D ** -0.5}")
        if getattr(layer, "logit_cap", 0) and layer.logit_cap > 0:
            problems.append(f"logit_cap {layer.logit_cap} (logit capping)")
        if (getattr(layer, "sliding_window_size", -1) or -1) > -1:
            problems.append(f"sliding window {layer.sliding_window_size}")
        if getattr(layer, "is_cross_attention", False):
            problems.append("cross-attention")
        if (layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim) != \
                (self.num_q_heads, self.num_kv_heads, D, D):
            problems.append(f"heads {layer.tp_q_head_num}/{layer.tp_k_head_num} x "
                            f"{layer.qk_head_dim}/{layer.v_head_dim} differ from the model "
                            f"config's {self.num_q_heads}/{self.num_kv_heads} x {D}")
        if not 0 <= layer.layer_id < self.num_layers:
            problems.append(f"layer_id outside 0..{self.num_layers - 1}")
        if problems:
            raise ConfigError(f"layer {layer.layer_id}: " + "; ".join(problems) +
                              " is not supported by the hybrid runtime")
        self._checked.add(layer.layer_id)

    def support_triton(self) -> bool:
        return False

    # ---- inspection -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """The runtime's counters (`HybridAttention.stats`) and the live request count."""
        return {**self.runtime.stats(), "requests": len(self.requests)}
