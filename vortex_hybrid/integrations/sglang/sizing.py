"""One copy of the KV: SGLang's KV pool sized by the runtime, a prefill staging area, and refusals
that do not take the engine down. Imports sglang (used by the plugin's hooks and the backend, in
SGLang's processes only).

- **Sizing** (`plan`, hooked on SGLang's `KVCacheConfigurator`): the runtime's memory plan
  (`runtime.memory_model.plan_memory`) is made when SGLang sizes its KV pool, within the HBM SGLang
  would have given that pool unless `gpu_memory_gib` says otherwise (`within_sglang`), and SGLang's
  `max_total_num_tokens` becomes the runtime's token capacity (host placements: the host store;
  `dense`/`gpu`: the device pool; SGLang's `--max-total-tokens` caps it, and the store with it)
  and its
  `max_running_requests` at most what the runtime's tail pages serve. SGLang's allocator and
  scheduler admit by that count; SGLang's own pool is built as its `NoOpMHATokenToKVPool` of that
  size: slot ids for the scheduler, no K/V storage (any read or write of it raises).
- **Staging** (`Staging`): prefill runs SGLang's dense backend over a small pool of its own in
  HBM (`staging_bytes`). Per extend batch, each request's tokens are placed there; the earlier
  chunks of a chunked prefill are read back from the runtime one layer at a time, just before
  that layer attends, into a region the layers share; the dense backend writes the new tokens and
  attends, the backend syncs the new tokens into the runtime, and the staging area is empty again. Decode reads the runtime only. SGLang's radix (prefix) cache would hand a new
  request slots whose K/V no pool holds, so the plugin turns it off (`--disable-radix-cache`).
- **Refusals** (`FAILED`, `abort_failed`, hooked on `Scheduler.process_batch_result`): a request
  whose K/V the runtime cannot take (`OutOfPagesError` at the post-prefill sync) is marked; the
  scheduler then finishes it with `FINISH_ABORT` (its client gets the error, its row and slots are
  freed) and the batch's other requests go on. Until then its later chunks and decode steps attend
  nothing of it (their outputs are zeros, and none is returned: the request ends at its prefill's
  result).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
from typing import Optional

import psutil
import torch

from ...config import HybridConfig
from ...kv.page_pool import GIB
from ...runtime.memory_model import HOST_PLACEMENTS, TAIL_PAGES, MemoryPlan, plan_memory
from .config import BACKEND_NAME, cuda_graph_phases, from_text

log = logging.getLogger(__name__)

_PLANS: dict[int, tuple[HybridConfig, MemoryPlan]] = {}
"""id(server_args) -> the config and memory plan SGLang's pool was sized by (this process)."""


def graph_pages(server_args) -> int:
    """Device pages SGLang's decode graphs take from the runtime: the scratch page of the
    fixed-shape steps' padding rows (`runtime.fixed_shape`), when SGLang will capture decode graphs
    (a CUDA engine without --disable-cuda-graph)."""
    device = str(getattr(server_args, "device", "cuda") or "cuda")
    return 1 if device != "cpu" and "decode" in cuda_graph_phases(server_args) else 0


def tokens_of(cfg: HybridConfig, mem: MemoryPlan, graph_pages: int = 0) -> int:
    """The token capacity of an empty runtime with this plan (what `HybridAttention.capacity()`
    reports before any request: the host store in host placements, the device pool otherwise,
    less the decode graphs' scratch page)."""
    if cfg.placement in HOST_PLACEMENTS:
        return mem.host_pages * cfg.page_size
    return (mem.device_pages - graph_pages) * cfg.page_size


def max_requests_of(cfg: HybridConfig, mem: MemoryPlan, graph_pages: int = 0) -> Optional[int]:
    """Requests the runtime serves at once (host placements: each holds a tail page and a prefill
    streams through one more; `HybridAttention.max_requests` less that one); None: pages only."""
    if cfg.placement not in HOST_PLACEMENTS:
        return None
    return mem.device_pages - mem.gpu_cache_pages - 2 - graph_pages


def within_sglang(cfg: HybridConfig, gpu_free: int, sglang_bytes: Optional[int],
                  staging_bytes: int = 0) -> HybridConfig:
    """`cfg` with, when `gpu_memory_gib` is None, the HBM SGLang would have given its own KV pool
    (`sglang_bytes`, from its `--mem-fraction-static`) less the staging area, where that is less
    than the memory model's default (free HBM `gpu_free`, staging already out, less
    `gpu_reserve_gib`). SGLang leaves the rest of HBM to its activations and CUDA graphs; taking
    it (the default alone) ran a Llama-3-8B engine out of memory in its first prefill."""
    if cfg.gpu_memory_gib is not None or not sglang_bytes:
        return cfg
    share = int(sglang_bytes) - int(staging_bytes)
    if share <= 0:
        from .config import ConfigError
        raise ConfigError(f"SGLang's KV budget ({sglang_bytes / GIB:.2f} GiB from "
                          f"--mem-fraction-static) does not hold the prefill staging area "
                          f"({staging_bytes / GIB:.2f} GiB): raise --mem-fraction-static, lower "
                          "--chunked-prefill-size, or set gpu_memory_gib")
    if share >= gpu_free - int(cfg.gpu_reserve_gib * GIB):
        return cfg
    return dataclasses.replace(cfg, gpu_memory_gib=share / GIB)


def plan(cfg: HybridConfig, model_config, device: str, max_tokens: Optional[int] = None,
         staging_bytes: int = 0, sglang_bytes: Optional[int] = None) -> MemoryPlan:
    """The runtime's memory plan for SGLang's model on `device` (the free HBM now on CUDA, less
    `staging_bytes`: the prefill staging area, allocated after the runtime; with `gpu_memory_gib`
    None, no more than `sglang_bytes` with the staging area: `within_sglang`); with `max_tokens`
    (SGLang's `--max-total-tokens`), the store holds no more than that."""
    L, hkv, D = (int(model_config.num_hidden_layers), int(model_config.num_key_value_heads),
                 int(model_config.head_dim))
    gpu_free = max(0, torch.cuda.mem_get_info()[0] - staging_bytes) \
        if str(device).startswith("cuda") else None
    if gpu_free is not None:
        cfg = within_sglang(cfg, gpu_free, sglang_bytes, staging_bytes)
    kw = dict(gpu_free_bytes=gpu_free, host_available_bytes=psutil.virtual_memory().available)
    mem = plan_memory(cfg, L, hkv, D, **kw)
    pages = None if not max_tokens else int(max_tokens) // cfg.page_size
    if pages is None or pages * cfg.page_size >= tokens_of(cfg, mem):
        return mem
    if cfg.placement in HOST_PLACEMENTS:
        return plan_memory(cfg, L, hkv, D, **kw, device_pages=mem.device_pages, host_pages=pages)
    return plan_memory(cfg, L, hkv, D, **kw, device_pages=pages)


def planned(server_args) -> Optional[tuple[HybridConfig, MemoryPlan]]:
    """The (config, plan) SGLang's pool was sized by for these server args; None when the plugin
    did not size it (a runner built by hand)."""
    return _PLANS.get(id(server_args))


def _ours(configurator) -> bool:
    sa = configurator.server_args
    return getattr(sa, "attention_backend", None) == BACKEND_NAME and \
        not configurator.is_draft_worker and bool(getattr(sa, "vortex_hybrid_config", None))


def resolve_pool_config(original, self, *args, **kwargs):
    """`KVCacheConfigurator._resolve_memory_pool_config` (AROUND): SGLang's config with the token
    count and request count of the runtime's plan (module docstring)."""
    config = original(self, *args, **kwargs)
    if not _ours(self):
        return config
    from .config import ConfigError
    cfg = from_text(self.server_args.vortex_hybrid_config)
    mc = self.model_config
    rows = int(getattr(config, "max_running_requests", 0) or 0) or None
    per_token = int(mc.num_hidden_layers) * int(mc.num_key_value_heads) * int(mc.head_dim) * 2 * \
        torch.empty((), dtype=self.kv_cache_dtype).element_size()
    staging = staging_bytes(self.server_args, int(mc.context_len), rows, cfg.page_size,
                            int(mc.num_hidden_layers), per_token // int(mc.num_hidden_layers))
    max_tokens = getattr(self.server_args, "max_total_tokens", None)
    # SGLang's pool size from its memory profile; a --max-total-tokens caps that count and then
    # says how many tokens to hold, not how much HBM to leave (it caps the store below)
    sglang_bytes = None if max_tokens else \
        int(getattr(config, "max_total_num_tokens", 0) or 0) * per_token
    try:
        mem = plan(cfg, mc, self.device, max_tokens, staging_bytes=staging,
                   sglang_bytes=sglang_bytes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    scratch = graph_pages(self.server_args)
    config.max_total_num_tokens = tokens_of(cfg, mem, scratch)
    most = max_requests_of(cfg, mem, scratch)
    if most is not None and (config.max_running_requests or most) > most:
        config.max_running_requests = most
    _PLANS[id(self.server_args)] = (cfg, mem)
    return config


def build_mha_pool(original, self, *args, **kwargs):
    """`KVCacheConfigurator._build_mha_kv_pool` (AROUND): SGLang's pool as slot ids only
    (`NoOpMHATokenToKVPool`) when the runtime holds the KV."""
    if _ours(self) and planned(self.server_args) is not None:
        from sglang.srt.mem_cache.memory_pool import NoOpMHATokenToKVPool
        kwargs["mha_pool_class"] = NoOpMHATokenToKVPool
    return original(self, *args, **kwargs)


def holds_no_kv(pool) -> bool:
    """Whether SGLang's KV pool is the slot-ids-only pool the plugin gave it."""
    from sglang.srt.mem_cache.memory_pool import NoOpMHATokenToKVPool
    return isinstance(pool, NoOpMHATokenToKVPool)


def staging_slots(server_args, context_len: int, rows: Optional[int],
                  page_size: int) -> tuple[int, int]:
    """Slots of one layer of the prefill staging area: (own, prefix). own: the padding page
    (slot 0's) and one extend batch's own tokens, which are at most `--max-prefill-tokens` (or
    `--chunked-prefill-size` when larger) new tokens, each row's from the page holding its first
    new token (so up to a page of earlier tokens more) and starting on a page of its own (at most
    one request per new token, and at most `rows`; None: not known yet, one per new token).
    prefix: the earlier whole pages of one chunked request (below the context length), restaged
    layer by layer into one region every layer shares (`Staging`)."""
    new = max(int(getattr(server_args, "max_prefill_tokens", 0) or 0),
              int(getattr(server_args, "chunked_prefill_size", 0) or 0))
    P = page_size
    starts = new + 1 if rows is None else min(rows, new + 1)
    return (-(-new // P) + 2 * starts + 1) * P, -(-context_len // P) * P


def staging_bytes(server_args, context_len: int, rows: Optional[int], page_size: int,
                  num_layers: int, token_bytes: int) -> int:
    """HBM of the prefill staging area (`Staging`): every layer's own slots and one shared
    prefix region; token_bytes: K and V of one token in one layer."""
    own, prefix = staging_slots(server_args, context_len, rows, page_size)
    return (num_layers * own + prefix) * token_bytes


_LAYERED = None


def _layered_pool_class():
    """SGLang's `MHATokenToKVPool` whose per-layer buffers overlap (`Staging`); built on first
    use (sglang is imported in SGLang's processes only)."""
    global _LAYERED
    if _LAYERED is None:
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        class LayeredStagingPool(MHATokenToKVPool):
            """Layer l's buffer is rows [l * own, l * own + own + prefix) of one tensor: its own
            slots, then a prefix region that overlaps the own slots of the layers after it, which
            they write only later, in their own forward (SGLang's default NHD layout: a buffer
            is [slots, heads, head_dim]; other layouts are refused)."""

            def __init__(self, own: int, prefix: int, **kw) -> None:
                self._own, self._prefix = own, prefix
                super().__init__(own + prefix - kw["page_size"], **kw)

            def _create_buffers_normal(self):
                if self.kv_cache_layout != "nhd":
                    from .config import ConfigError
                    raise ConfigError(f"KV cache layout {self.kv_cache_layout!r} (e.g. "
                                      "SGLANG_USE_HND_KVCACHE=1): the plugin's prefill staging "
                                      "area needs SGLang's default 'nhd' layout; unset it")
                L, A, B = self.layer_num, self._own, self._prefix

                def views(head_dim: int) -> list:
                    base = torch.zeros((L * A + B, self.head_num, head_dim),
                                       dtype=self.store_dtype, device=self.device)
                    return [base[layer * A:layer * A + A + B] for layer in range(L)]
                self.k_buffer, self.v_buffer = views(self.head_dim), views(self.v_head_dim)

            def get_kv_size_bytes(self):
                """(K, V) bytes, each storage counted once (the layers' buffers overlap)."""
                return tuple(sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                                  for t in buffers}.values())
                             for buffers in (self.k_buffer, self.v_buffer))

        _LAYERED = LayeredStagingPool
    return _LAYERED


class Staging:
    """The prefill staging area (module docstring): a pool of SGLang's class, each layer's buffer
    `own + prefix` slots, and a request-to-slot table of SGLang's shape, seen by the dense prefill
    backend instead of SGLang's pools. Per extend batch (`place`), each row's own tokens (from the
    page holding its first new token) take slots of the own region (from slot page_size on: slot
    0's page absorbs padded writes) and its earlier whole pages slots of the prefix region. The
    backend writes a layer's earlier tokens there just before that layer attends (`write_layer`):
    the layers' prefix regions share memory, so the area holds one layer's earlier chunks, not
    every layer's, and the new tokens of every layer (which the backend syncs into the runtime
    after the last layer)."""

    def __init__(self, model_runner, own: int, prefix: int) -> None:
        src = model_runner.token_to_kv_pool
        self.page_size = int(src.page_size)
        self.own, self.prefix = own, prefix
        self.pool = _layered_pool_class()(
            own, prefix, page_size=self.page_size, dtype=src.dtype, head_num=src.head_num,
            head_dim=src.head_dim, layer_num=src.layer_num, device=src.device,
            enable_memory_saver=False, allocation_label="vortex_hybrid prefill staging")
        rtt = model_runner.req_to_token_pool.req_to_token
        self.req_to_token_pool = types.SimpleNamespace(
            req_to_token=torch.zeros_like(rtt), size=model_runner.req_to_token_pool.size)

    @property
    def bytes(self) -> int:
        """HBM the area takes (its buffers' storages, each counted once)."""
        return sum(self.pool.get_kv_size_bytes())

    def runner(self, model_runner):
        """A view of `model_runner` whose pools are the staging area's (for the dense backend)."""
        view = copy.copy(model_runner)
        view.req_to_token_pool = self.req_to_token_pool
        view.token_to_kv_pool = self.pool
        return view

    def place(self, rows: list[int], starts: list[int], ends: list[int]) -> torch.Tensor:
        """Slots for tokens [0, end) of each row (above); returns the staging slots of the new
        tokens [start, end), concatenated."""
        P, table = self.page_size, self.req_to_token_pool.req_to_token
        firsts = [s // P * P for s in starts]
        own = P + sum(-(-(e - f) // P) for f, e in zip(firsts, ends)) * P
        prefix = sum(firsts)
        if own > self.own or prefix > self.prefix:
            from ...kv.errors import OutOfPagesError
            raise OutOfPagesError(f"an extend batch of {sum(ends)} tokens (rows {rows}, lengths "
                                  f"{ends}) needs {own} staging slots for its own pages and "
                                  f"{prefix} for earlier chunks; the staging area has {self.own} "
                                  f"and {self.prefix} (raise --max-prefill-tokens)")
        nxt, pre, new = P, self.own, []
        arange = (lambda a, b: torch.arange(a, b, dtype=table.dtype, device=table.device))
        for row, first, start, end in zip(rows, firsts, starts, ends):
            if first:
                table[row, :first] = arange(pre, pre + first)
                pre += first
            n = -(-(end - first) // P) * P
            slots = arange(nxt, nxt + n)
            table[row, first:first + n] = slots
            new.append(slots[start - first:end - first].to(torch.int64))
            nxt += n
        return torch.cat(new) if new else torch.zeros(0, dtype=torch.int64)

    def write_layer(self, layer: int, slots: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> None:
        """K and V [T, Hkv, D] of T tokens of one layer into `slots` (restaging earlier chunks)."""
        kb, vb = self.pool.k_buffer[layer], self.pool.v_buffer[layer]
        slots = slots.to(kb.device)
        kb[slots] = k.to(kb.device, kb.dtype)
        vb[slots] = v.to(vb.device, vb.dtype)

    def slots(self, row: int, start: int, end: int) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token[row, start:end].to(torch.int64)


FAILED: dict[tuple[int, int], str] = {}
"""(request-pool row, generation) -> why the runtime refused its K/V: the scheduler aborts it."""


def abort_failed(original, self, batch, result):
    """`Scheduler.process_batch_result` (AROUND): the batch's requests the runtime refused finish
    with `FINISH_ABORT` (their clients get the reason); then SGLang processes the result."""
    if FAILED and batch is not None and getattr(batch, "reqs", None):
        from http import HTTPStatus

        from sglang.srt.managers.schedule_batch import FINISH_ABORT
        gens = getattr(getattr(self, "req_to_token_pool", None), "req_generation", None)
        for req in batch.reqs:
            row = getattr(req, "req_pool_idx", None)
            if row is None:
                continue
            gen = int(gens[row]) if gens is not None else 0
            why = FAILED.pop((int(row), gen), None)
            if why is not None and not req.finished():
                log.warning("vortex_hybrid: request %s aborted: %s", req.rid, why)
                req.to_finish = FINISH_ABORT(why, HTTPStatus.SERVICE_UNAVAILABLE,
                                             "OutOfKVMemory")
    return original(self, batch, result)


def describe(cfg: HybridConfig, mem: MemoryPlan, staging_bytes: int, tokens: int,
             requests: Optional[int]) -> str:
    """The start-up line: placement, HBM and host memory for KV, token capacity, GPU cache."""
    return (f"vortex_hybrid: placement {cfg.placement}; KV in HBM "
            f"{(mem.device_bytes + staging_bytes) / GIB:.3f} GiB (runtime "
            f"{mem.device_bytes / GIB:.3f} GiB, prefill staging {staging_bytes / GIB:.3f} GiB), "
            f"in host memory {mem.host_bytes / GIB:.3f} GiB; capacity {tokens} tokens"
            f"{'' if requests is None else f', {requests} requests'}; GPU cache "
            f"{mem.gpu_cache_pages} pages")


__all__ = ["FAILED", "Staging", "abort_failed", "build_mha_pool", "describe", "holds_no_kv",
           "max_requests_of", "plan", "planned", "resolve_pool_config", "staging_bytes",
           "staging_slots",
           "tokens_of", "TAIL_PAGES", "within_sglang"]
