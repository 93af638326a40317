"""transformers integration: hybrid sparse decode attention inside a Hugging Face model.

    from vortex_hybrid import HybridConfig
    from vortex_hybrid.integrations.hf import HybridCache, ATTN_IMPLEMENTATION
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION)
    cache = HybridCache(model, HybridConfig(placement="hybrid", budget_ratio=0.05, host_memory_gib=8))
    out = model.generate(ids, attention_mask=mask, **{CACHE_ARGUMENT: cache}, max_new_tokens=32)
    cache.close()

`CACHE_ARGUMENT` is the keyword transformers takes a cache under: `cache` in releases that renamed
it (5.25 here; `past_key_values` warns there), `past_key_values` before.

Importing this module registers the attention function `vortex_hybrid` with transformers'
`AttentionInterface`, and transformers' SDPA mask builder under the same name (without one, a custom
attention function receives `attention_mask=None`, which is wrong for padded batches).

How a forward pass maps onto `HybridAttention` (one runtime per cache, sized from the model's
config: layers, query and KV heads, head_dim):
- **prefill** (the first forward, the whole prompt): each layer attends densely (transformers' SDPA
  over the prompt, its mask included) while the cache keeps the layer's keys and values; after the
  last layer every batch row becomes a request (`add_request`) holding the KV of its real tokens
  only (left padding dropped, from the mask), which fills the paged store, the summaries and the
  host pool;
- **decode** (one token per row): layer 0's `update` plans the step (`plan`), and each layer's
  attention is `HybridAttention.run(layer, q, k_new, v_new)`: select, partition, attend on the GPU
  and the CPU, merge.
The model's RoPE, projections and MLPs are untouched: the runtime sees post-RoPE keys. The attention
function reaches the cache through an attribute on each attention module (`generate` rejects unknown
keyword arguments), set by the cache's `update` of that layer, so several caches can take turns on
one model (`admit` shares one prefill among them).

Supported: decoder-only models whose full-attention layers use scaling head_dim ** -0.5 (Llama,
Qwen2/3, Mistral without a sliding window, SmolLM2, Gemma-3 text). Sliding-window layers (Gemma-3's
local layers) stay dense over their window in a transformers `DynamicSlidingWindowLayer`; the runtime
serves the full-attention layers only (`runtime_layer` maps them). Refused with a message: models
whose every layer slides, other layer types, other scalings, softcapping, a second prefill into a
cache that already holds requests (one `generate` per cache), a calibration made for another model
(its shapes, checked by the runtime, or its name: `model.config.name_or_path`'s last part, checked
here; `predictors.calibration.Calibration.check_model`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Optional

import torch
from transformers import AttentionInterface, GenerationMixin
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..config import HybridConfig
from ..runtime.hybrid_attention import HybridAttention
from ..runtime.memory_model import HOST_PLACEMENTS, TAIL_PAGES

ATTN_IMPLEMENTATION = "vortex_hybrid"
CACHE_ARGUMENT = ("cache" if "cache" in inspect.signature(
    GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values")
"""The keyword a model's forward and `generate` take the cache under in the installed transformers
(`cache`, or `past_key_values` before it was renamed): `model(x, **{CACHE_ARGUMENT: cache})`."""


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _attention_modules(model) -> list:
    """The model's self-attention modules, in layer order (each has `layer_idx`)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    return sorted(mods, key=lambda m: m.layer_idx)


class _HybridLayer(CacheLayerMixin):
    """One layer's view of a `HybridCache`: counts tokens (padded, as transformers does) and hands
    the new keys and values through; the KV itself lives in the runtime."""

    is_sliding = False

    def __init__(self, cache: "HybridCache", layer: int) -> None:
        super().__init__()
        self.cache, self.layer, self.n = cache, layer, 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cache._update(self.layer, key_states, value_states)
        self.n += key_states.shape[2]
        return key_states, value_states

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):        # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.n + query_length, 0

    def get_seq_length(self) -> int:
        return self.n

    def get_max_length(self) -> int:
        return -1


@dataclasses.dataclass
class ModelShape:
    """What the runtime needs of a transformers model (`model_shape`)."""
    full_layers: list            # model layers with full attention (the runtime serves these)
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    window: Optional[int]        # the sliding-window layers' window, if any
    modules: list                # the attention modules, by layer


def model_shape(model) -> ModelShape:
    """The model's attention shape, checked against what the hybrid runtime supports (module
    docstring); ValueError with one line naming what is not."""
    c = _text_config(model)
    hq = c.num_attention_heads
    hkv = getattr(c, "num_key_value_heads", None) or hq
    D = getattr(c, "head_dim", None) or c.hidden_size // hq
    L = c.num_hidden_layers
    window = getattr(c, "sliding_window", None)
    types = list(getattr(c, "layer_types", None) or
                 ["sliding_attention" if window else "full_attention"] * L)
    odd = sorted({t for t in types} - {"full_attention", "sliding_attention"})
    if odd:
        raise ValueError(f"{type(model).__name__}: layer types {odd} are not supported by "
                         "the hybrid runtime (full and sliding-window attention are)")
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if not full:
        raise ValueError(f"{type(model).__name__}: every layer slides over a window of "
                         f"{window} tokens; the hybrid runtime serves full-attention layers")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, name, None):
            raise ValueError(f"{type(model).__name__}: {name}={getattr(c, name)} is not "
                             "supported by the hybrid runtime's attention")
    mods = _attention_modules(model)
    if len(mods) != L:
        raise ValueError(f"{type(model).__name__}: found {len(mods)} attention modules with a "
                         f"layer_idx, expected num_hidden_layers={L}")
    for i in full:
        if not math.isclose(float(mods[i].scaling), D ** -0.5, rel_tol=1e-6):
            raise ValueError(f"layer {i}: attention scaling {mods[i].scaling} is not "
                             f"head_dim ** -0.5 = {D ** -0.5}; the hybrid kernels use the latter")
    return ModelShape(full, hq, hkv, D, window, mods)


class HybridCache(Cache):
    """A transformers `Cache` backed by one `HybridAttention` (module docstring). Pass it as
    `past_key_values`; `close()` frees its requests and worker. `runtime_kw` go to
    `HybridAttention` (device_pages, host_pages, device, costs, cuda_graphs).

    selector (research and diagnostics, e.g. the eval's `eval.mass_oracle.MassOracle`): chooses
    the pages instead of the flow. Its `admit(keys)` gets each request's real tokens' keys [L, T,
    Hkv, D] (runtime layers, in request order) and `select(layer, q, k_new)` returns each decode
    layer's selection, passed to `HybridAttention.run(..., sel=...)` (checked there); not with
    placement `dense`."""

    def __init__(self, model, cfg: HybridConfig, *, selector=None, **runtime_kw) -> None:
        if selector is not None and cfg.placement == "dense":
            raise ValueError("HybridCache: a selector chooses pages for a sparse placement; "
                             "cfg.placement is 'dense'")
        if selector is not None and not (callable(getattr(selector, "admit", None)) and
                                         callable(getattr(selector, "select", None))):
            raise ValueError(f"HybridCache: selector {selector!r} needs admit(keys) and "
                             "select(layer, q, k_new) methods")
        self.selector = selector
        shape = model_shape(model)
        full, hq, hkv, D, window, mods = (shape.full_layers, shape.num_q_heads,
                                          shape.num_kv_heads, shape.head_dim, shape.window,
                                          shape.modules)
        L = len(mods)
        runtime_kw.setdefault("device", next(model.parameters()).device)
        self.runtime = HybridAttention(cfg, len(full), hq, hkv, D, **runtime_kw)
        if self.runtime.calibration is not None:    # the runtime checked the shapes; the name:
            try:
                self.runtime.calibration.check_model(
                    f"HybridConfig.calibration {cfg.calibration!r}", "HybridCache",
                    name=getattr(model.config, "name_or_path", None))
            except ValueError:
                self.runtime.close()
                raise
        self.runtime_layer = {layer: r for r, layer in enumerate(full)}
        """Model layer -> runtime layer, for the full-attention layers the runtime serves."""
        self.rids: list[int] = []
        self._prefill: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decoding = False
        super().__init__(layers=[_HybridLayer(self, i) if i in self.runtime_layer
                                 else DynamicSlidingWindowLayer(sliding_window=window)
                                 for i in range(L)])
        self._modules = mods
        for i in full:
            mods[i].vortex_hybrid_cache = self

    @classmethod
    def for_tokens(cls, model, cfg: HybridConfig, batch: int, tokens: int,
                   cache_share: Optional[float] = None, **runtime_kw) -> "HybridCache":
        """A cache whose pools hold `batch` requests of up to `tokens` tokens each (prompt and
        generated): every page in the device pool for `dense`/`gpu`; in the host pool for the host
        placements, whose device pool keeps the tail pages and the GPU cache slots (as many as
        `gpu_memory_gib` holds, unless `gpu_cache_pages` is set). cache_share: sets
        `gpu_cache_pages` to that share of the batch's pages (at least 8)."""
        pages = -(-tokens // cfg.page_size) + 2                        # per request, at most
        if cache_share is not None:
            cfg = dataclasses.replace(cfg, gpu_cache_pages=max(8, int(cache_share * batch * pages)))
        pool = batch * (pages + 8)
        if cfg.placement in HOST_PLACEMENTS:
            runtime_kw["host_pages"] = pool
            if cfg.gpu_cache_pages is not None:          # else: the HBM budget's slots
                runtime_kw["device_pages"] = TAIL_PAGES + cfg.gpu_cache_pages
        else:
            runtime_kw.update(host_pages=0, device_pages=pool)
        return cls(model, cfg, **runtime_kw)

    # ---- called by the layers and the attention function ------------------------------------
    def _update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._modules[layer].vortex_hybrid_cache = self   # the cache of this forward (of several)
        layer = self.runtime_layer[layer]
        if k.shape[2] > 1 or not self.rids:
            if self.rids:
                raise ValueError(f"HybridCache: a second prefill ({k.shape[2]} tokens) into a cache "
                                 "that already holds requests; use one cache per generate() call")
            self._prefill[layer] = (k, v)
            return
        if layer == 0:
            self.runtime.plan(self.rids)
            self._decoding = True

    def _admit(self, attention_mask: Optional[torch.Tensor]) -> None:
        """After the prefill's last layer: each batch row becomes a request with its real tokens
        (the last query row of the mask sees every real token)."""
        L = self.runtime.num_layers
        keys = [self._prefill[i][0] for i in range(L)]
        values = [self._prefill[i][1] for i in range(L)]
        self._prefill.clear()
        keep = None
        if attention_mask is not None:
            last = attention_mask[:, 0, -1, -keys[0].shape[2]:]
            keep = last if last.dtype == torch.bool else last == 0
        self._add_rows(keys, values, keep)

    def admit(self, keys: list, values: list, attention_mask: Optional[torch.Tensor] = None
              ) -> None:
        """Start from a prefill computed elsewhere (e.g. one SDPA prefill shared by several caches):
        keys, values per model layer [B, Hkv, T, D] (a `DynamicCache`'s layers' `keys`/`values`;
        a sliding layer's may hold only its window); attention_mask [B, T] (1 = real token) or None.
        Decoding continues at position T."""
        if self.rids:
            raise ValueError("HybridCache.admit: the cache already holds requests")
        if len(keys) != len(self.layers) or len(values) != len(keys):
            raise ValueError(f"admit needs keys and values of {len(self.layers)} layers, got "
                             f"{len(keys)} and {len(values)}")
        full = sorted(self.runtime_layer)
        T = keys[full[0]].shape[2]
        keep = None if attention_mask is None else attention_mask.to(keys[0].device).bool()
        self._add_rows([keys[i] for i in full], [values[i] for i in full], keep)
        for i, layer in enumerate(self.layers):
            if i in self.runtime_layer:
                layer.n = T
                layer.is_initialized = True
            else:                                       # the window's tokens, then the position
                layer.update(keys[i], values[i])
                layer.cumulative_length = T

    def _add_rows(self, keys: list, values: list, keep: Optional[torch.Tensor]) -> None:
        k, v = torch.stack(keys), torch.stack(values)                   # [L, B, Hkv, T, D]
        B, T = k.shape[1], k.shape[3]
        if keep is None:
            keep = torch.ones(B, T, dtype=torch.bool, device=k.device)
        for b in range(B):
            pos = keep[b].nonzero().flatten()
            kb = k[:, b].index_select(2, pos).permute(0, 2, 1, 3)       # [L, Tb, Hkv, D]
            vb = v[:, b].index_select(2, pos).permute(0, 2, 1, 3)
            self.rids.append(self.runtime.add_request(kb.contiguous(), vb.contiguous()))
            if self.selector is not None:
                self.selector.admit(kb)

    def _attend(self, module, query, key, value, attention_mask, **kw):
        layer = self.runtime_layer[module.layer_idx]
        if not self._decoding:                          # prefill: dense over the prompt
            out = sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
            if layer == self.runtime.num_layers - 1:
                self._admit(attention_mask)
            return out
        q, k, v = query[:, :, 0], key[:, :, 0], value[:, :, 0]
        sel = None if self.selector is None else self.selector.select(layer, q, k)
        o = self.runtime.run(layer, q, k, v, sel)
        return o[:, None], None                          # [B, 1, Hq, D]

    def stats(self) -> dict:
        return self.runtime.stats()

    def close(self) -> None:
        """Free the requests and the runtime's worker (the cache is unusable afterwards). A step
        left open by a failure (an exception between plan() and its last layer) is cancelled
        first, so the failure that left it propagates, not a refusal to free its requests."""
        self.runtime.cancel_step()
        for rid in self.rids:
            self.runtime.remove_request(rid)
        self.rids = []
        self.runtime.close()


def hybrid_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function (`attn_implementation="vortex_hybrid"`): query [B, Hq, q,
    D], key/value [B, Hkv, kv, D] as the cache's update returned; out [B, q, Hq, D]. Sliding-window
    layers attend densely over their window (their cache layer returns just that)."""
    if getattr(module, "is_sliding", False) or getattr(module, "sliding_window", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    cache = getattr(module, "vortex_hybrid_cache", None)
    if cache is None:
        raise ValueError("attn_implementation='vortex_hybrid' needs a HybridCache: pass "
                         f"{CACHE_ARGUMENT}=HybridCache(model, cfg)")
    return cache._attend(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register the attention function and its mask builder with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, hybrid_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


register()
