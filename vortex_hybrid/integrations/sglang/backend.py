"""`VortexHybridBackend`: SGLang's `AttentionBackend` over one `HybridAttention`.

SGLang drives it per forward batch: `init_forward_metadata(batch)` once, then each layer's
`forward_extend` or `forward_decode` in order. How the calls map onto the runtime:

- **prefill (extend)**: dense attention over SGLang's KV pool by SGLang's own backend (`triton` on
  CUDA, `torch_native` elsewhere; `VORTEX_HYBRID_SGLANG_PREFILL` overrides), which also writes the
  new tokens' K and V into the pool; prefix-cache hits and chunked prefill included. When the
  last layer has run, every row of the batch is synced into the runtime (`RequestMap.sync`): its new tokens (all of them, for a new request or a prefix-cache hit) are
  read from SGLang's pool through `req_to_token` and appended to the runtime's paged store, which
  fills the summaries and, in host placements, the pinned host copies. Nothing else is copied: a
  decode step moves one token per layer.
- **decode**: `init_forward_metadata` syncs the rows (a no-op check in the steady state) and calls
  `HybridAttention.plan` once for all layers; each layer writes the token into SGLang's pool too
  (its prefix cache and later prefills read it there) and returns `HybridAttention.run`.
- **requests**: SGLang's request-pool rows recycle; `RequestMap` ties a runtime request to a row
  and its generation, and the pool's `free` (wrapped on this backend's pool object) drops finished
  requests between steps.

Pages: the runtime's page size equals SGLang's `--page-size` (checked at start-up), so the runtime's
logical page p of a request holds the tokens of SGLang's page `req_to_token[row, p * page_size]
// page_size`. The runtime keeps its own copy of the KV (its layout is [page, Hkv, page_size, D],
SGLang's pool [token, Hkv, D]); SGLang's pool stays whole in HBM.

Not supported (refused at start-up by `config.check_server_args` / `check_model`, and here when a
layer shows it): SGLang's CUDA graphs, mixed prefill+decode batches, speculative decoding, tensor
/ pipeline / data parallelism, sliding windows, logit capping, scalings other than head_dim ** -0.5,
cross-attention.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ...config import HybridConfig
from ...runtime.hybrid_attention import HybridAttention
from ...runtime.memory_model import HOST_PLACEMENTS, TAIL_PAGES
from .config import CUDA_GRAPH_REFUSAL, ConfigError, check_model
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


def _prefill_backend(model_runner, device: torch.device):
    """SGLang's own backend that runs the dense prefill (extend) over its KV pool."""
    name = os.environ.get(PREFILL_ENV) or ("triton" if device.type == "cuda" else "torch_native")
    if name == "triton":
        from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
        return TritonAttnBackend(model_runner)
    if name == "torch_native":
        return TorchNativeAttnBackend(model_runner)
    raise ConfigError(f"{PREFILL_ENV}={name!r} must be 'triton' or 'torch_native'")


class VortexHybridBackend(AttentionBackend):
    """SGLang attention backend `vortex_hybrid` (module docstring)."""

    def __init__(self, model_runner, cfg: HybridConfig) -> None:
        super().__init__()
        mc = model_runner.model_config
        check_model(mc)
        self.device = torch.device(model_runner.device)
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.dense = _prefill_backend(model_runner, self.device)
        self.num_layers = int(mc.num_hidden_layers)
        self.num_q_heads, self.num_kv_heads = int(mc.num_attention_heads), int(mc.num_key_value_heads)
        self.head_dim = int(mc.head_dim)
        sizes = pool_sizes(cfg, int(model_runner.max_total_num_tokens),
                           int(self.req_to_token_pool.size))
        self.runtime = HybridAttention(cfg, self.num_layers, self.num_q_heads, self.num_kv_heads,
                                       self.head_dim, device=self.device, **sizes)
        self.requests = RequestMap(self.runtime)
        self._checked: set[int] = set()
        self._watch_frees(self.req_to_token_pool)
        log.info("vortex_hybrid: %s over %d layers, %d/%d heads, head_dim %d; pools %s",
                 cfg, self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim, sizes)

    @property
    def cfg(self) -> HybridConfig:
        return self.runtime.cfg

    def _watch_frees(self, pool) -> None:
        """Report every row the pool frees to the request map: the pool object's own `free_rows`
        (sglang 0.5.21: every row goes back through it) or `free(req)` (0.5.17), wrapped on this
        instance; SGLang's class is untouched."""
        requests = self.requests
        if hasattr(pool, "free_rows"):
            free_rows = pool.free_rows

            def watched_free_rows(indices, *args, **kwargs):
                out = free_rows(indices, *args, **kwargs)
                for row in indices:
                    requests.freed(int(row))
                return out

            pool.free_rows = watched_free_rows
            return
        free = pool.free

        def watched_free(req, *args, **kwargs):
            row = req if isinstance(req, int) else getattr(req, "req_pool_idx", None)
            out = free(req, *args, **kwargs)
            if row is not None:
                requests.freed(row)
            return out

        pool.free = watched_free

    # ---- per batch ------------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch) -> None:
        """Once per forward batch, before layer 0: drop freed requests; for a decode batch, sync
        its rows and plan the runtime's step (once for all layers)."""
        mode = forward_batch.forward_mode
        if mode.is_mixed() or mode.is_target_verify() or mode.is_draft_extend_v2():
            raise ConfigError(f"forward mode {mode.name} (mixed batches / speculative decoding) "
                              "is not supported; run without --enable-mixed-chunk and "
                              "speculative decoding")
        self.requests.drop_freed()
        if mode.is_extend():
            self.dense.init_forward_metadata(forward_batch)
        elif mode.is_decode():
            lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None \
                else forward_batch.seq_lens
            rids = self._sync(forward_batch.req_pool_indices.tolist(),
                              [n - 1 for n in lens.tolist()])
            self.runtime.plan(rids)

    def _sync(self, rows: list[int], lens: list[int]) -> list[int]:
        generation = getattr(self.req_to_token_pool, "req_generation", None)
        gens = generation[rows].tolist() if generation is not None else [0] * len(rows)
        return [self.requests.sync(row, gen, n, self._reader(row))
                for row, gen, n in zip(rows, gens, lens)]

    def _reader(self, row: int):
        """Tokens [start, end) of the request in pool row `row`, every layer, from SGLang's pool:
        k, v [num_layers, end - start, Hkv, D]."""
        def read(start: int, end: int):
            slots = self.req_to_token_pool.req_to_token[row, start:end].to(torch.int64)
            pool = self.token_to_kv_pool
            k = torch.stack([pool.get_key_buffer(i).index_select(0, slots)
                             for i in range(self.num_layers)])
            v = torch.stack([pool.get_value_buffer(i).index_select(0, slots)
                             for i in range(self.num_layers)])
            return k, v
        return read

    # ---- per layer ------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        """Dense prefill over SGLang's pool; after the last layer, the batch's new tokens go into
        the runtime. q [T, Hq * D] (or [T, Hq, D]); out [T, Hq * D]."""
        self._check_layer(layer)
        o = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        if layer.layer_id == self.num_layers - 1:
            self._sync(forward_batch.req_pool_indices.tolist(),
                       forward_batch.seq_lens.tolist())
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        """One token per request: written into SGLang's pool, then the runtime's layer step.
        q [B, Hq * D], k / v [B, Hkv * D] (or head-split); out [B, Hq * D] in q's dtype."""
        self._check_layer(layer)
        if k is None or v is None:
            raise ConfigError(f"layer {layer.layer_id} hands no new K/V to attention (KV shared "
                              "across layers), which the hybrid runtime does not serve")
        if save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc,
                                                                  None), k, v)
        B = forward_batch.batch_size
        o = self.runtime.run(layer.layer_id, q.reshape(B, self.num_q_heads, self.head_dim),
                             k.reshape(B, self.num_kv_heads, self.head_dim),
                             v.reshape(B, self.num_kv_heads, self.head_dim))
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

    # ---- CUDA graphs: refused (SGLang calls these only with its CUDA graphs on) ------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        raise ConfigError(CUDA_GRAPH_REFUSAL)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def support_triton(self) -> bool:
        return False

    # ---- inspection -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """The runtime's counters (`HybridAttention.stats`) and the live request count."""
        return {**self.runtime.stats(), "requests": len(self.requests)}
