"""Dense forward passes that measure every full-attention layer's heads on the way.

The model runs with the attention implementation `vortex_profile`: transformers' SDPA, after handing
the layer's post-RoPE queries, keys and values to a recorder set on the module. The recorder keeps
only what `measure_layer` returns (a few numbers per head), so a long prompt's per-layer tensors are
never held at once. Sliding-window layers are not measured: the runtime does not serve them.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..integrations.hf import model_shape
from ..predictors.head_properties import LayerProperties

PROFILE_ATTN = "vortex_profile"


def _profile_attention(module, query, key, value, attention_mask, **kwargs):
    recorder = getattr(module, "vortex_profile_recorder", None)
    if recorder is not None:
        recorder(module.layer_idx, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register `vortex_profile` with transformers (idempotent)."""
    AttentionInterface.register(PROFILE_ATTN, _profile_attention)
    AttentionMaskInterface.register(PROFILE_ATTN, sdpa_mask)


Measure = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], LayerProperties]


@torch.inference_mode()
def trace_prompt(model, ids: list[int], probes: int, measure: Measure,
                 on_layer: Callable[[], None] = lambda: None) -> list[LayerProperties]:
    """Properties of every full-attention layer (in order) for one prompt `ids`: `measure(q, k,
    v)` with q [probes, Hq, D] the last `probes` positions' queries, k, v [T, Hkv, D]."""
    shape = model_shape(model)
    order = {layer: i for i, layer in enumerate(shape.full_layers)}
    out: list = [None] * len(order)

    def record(layer, query, key, value):
        if layer in order:
            q = query[0, :, -probes:].transpose(0, 1)
            out[order[layer]] = measure(q, key[0].transpose(0, 1), value[0].transpose(0, 1))
            on_layer()

    for i in shape.full_layers:
        shape.modules[i].vortex_profile_recorder = record
    try:
        dev = next(model.parameters()).device
        model(input_ids=torch.tensor([ids], device=dev), use_cache=False)
    finally:
        for i in shape.full_layers:
            del shape.modules[i].vortex_profile_recorder
    if any(p is None for p in out):
        raise ValueError("the model's forward did not reach the vortex_profile attention in every "
                         "full-attention layer (load it with attn_implementation='vortex_profile')")
    return out


register()
