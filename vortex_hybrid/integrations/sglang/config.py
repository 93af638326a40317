"""The SGLang integration's configuration: `--vortex-hybrid-config` parsed into a `HybridConfig`
and checked against SGLang's own settings and the model, once, in the process that parses SGLang's
arguments (before any scheduler process starts).

    cfg = resolve(server_args, text)    # text: a JSON file path or inline JSON; None: defaults

Two fields follow SGLang when the JSON leaves them out: `page_size` (SGLang's `--page-size`; when
both are given they must be equal, so our pages are SGLang's pages) and `kv_dtype` (the KV cache
dtype SGLang runs with). Every problem raises `ConfigError`, a `ValueError` whose message is one
line that names the bad value and what is allowed.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from ...config import KV_DTYPES, HybridConfig

BACKEND_NAME = "vortex_hybrid"
"""The attention-backend name SGLang knows this backend by (`--attention-backend vortex_hybrid`)."""
MAX_HEAD_DIM = 256
"""Largest head_dim the attention kernels are built for (one head's row sits in registers)."""
CUDA_GRAPH_REFUSAL = ("--attention-backend vortex_hybrid runs in SGLang's decode CUDA graphs of "
                      "backend full only: pass --disable-prefill-cuda-graph (Engine: "
                      "disable_prefill_cuda_graph=True) and keep the decode graph backend full, "
                      "or pass --disable-cuda-graph")
_SGLANG_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16",
                  "float32": "float32", "float": "float32"}


class ConfigError(ValueError):
    """A `--vortex-hybrid-config` (or SGLang setting) the hybrid backend cannot run with."""

    def __init__(self, message: str) -> None:
        super().__init__(f"vortex_hybrid: {message}")


def load(text: Optional[str]) -> dict[str, Any]:
    """The config's fields from a JSON file path or an inline JSON object text (None or empty: no
    fields), checked: they must build a `HybridConfig` (page_size and kv_dtype may still come from
    SGLang)."""
    if text is None or not str(text).strip():
        return {}
    try:
        HybridConfig.from_json(text)            # reads, parses and checks, with its own messages
    except ValueError as exc:
        raise ConfigError(f"--vortex-hybrid-config {_short(text)}: {exc}") from None
    text = str(text)
    if not text.lstrip().startswith(("{", "[")):
        with open(text, encoding="utf-8") as fh:
            text = fh.read()
    return dict(json.loads(text))


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= 60 else text[:57] + "...")


def sglang_kv_dtype(server_args) -> str:
    """The KV cache dtype SGLang will run with, as a `HybridConfig.kv_dtype` name."""
    kv = getattr(server_args, "kv_cache_dtype", "auto") or "auto"
    if kv not in ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"):
        raise ConfigError(f"--kv-cache-dtype {kv!r} is not supported (the hybrid kernels store "
                          f"KV as one of {list(KV_DTYPES)}); use --kv-cache-dtype auto")
    kv = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(kv, kv)
    if kv != "auto":
        return kv
    dtype = str(getattr(server_args, "dtype", "auto") or "auto")
    if dtype == "auto":
        return "bfloat16"
    return _SGLANG_DTYPES.get(dtype, "bfloat16")


def build(fields: dict[str, Any], page_size: int, kv_dtype: str) -> HybridConfig:
    """The `HybridConfig` of `fields` with SGLang's page size and KV dtype where the fields leave
    them out; a page size different from SGLang's is refused."""
    fields = dict(fields)
    if "page_size" in fields and fields["page_size"] != page_size:
        raise ConfigError(f"page_size={fields['page_size']} differs from SGLang's --page-size "
                          f"{page_size}: pass --page-size {fields['page_size']} (or leave "
                          "page_size out of the config to follow SGLang)")
    fields.setdefault("page_size", page_size)
    fields.setdefault("kv_dtype", kv_dtype)
    try:
        return HybridConfig.from_dict(fields)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_model(model_config) -> None:
    """Refuse, with a one-line reason, a model the hybrid runtime cannot serve: MLA, attention
    whose query and value head sizes differ, sliding windows, logit softcapping, a scaling other
    than head_dim ** -0.5, head_dim above MAX_HEAD_DIM, query heads not a multiple of KV heads.
    `model_config`: SGLang's `ModelConfig`."""
    arch = getattr(model_config, "attention_arch", None)
    arch = str(getattr(arch, "name", arch))             # AttentionArch.MLA (an IntEnum) or a name
    hf = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    name = (getattr(model_config.hf_config, "architectures", None) or ["the model"])[0]
    if arch == "MLA":
        raise ConfigError(f"{name} uses multi-head latent attention (MLA), which the hybrid "
                          "runtime does not serve (it serves MHA/GQA models such as Llama, Qwen, "
                          "Mistral)")
    D = int(model_config.head_dim)
    v_dim = getattr(model_config, "v_head_dim", None) or D
    if v_dim != D:
        raise ConfigError(f"{name}: value head size {v_dim} differs from head_dim {D}; the hybrid "
                          "kernels need equal sizes")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ConfigError(f"{name}: head_dim={D} is not supported by the hybrid kernels "
                          f"(1..{MAX_HEAD_DIM})")
    hq, hkv = int(model_config.num_attention_heads), int(model_config.num_key_value_heads)
    if hq % hkv:
        raise ConfigError(f"{name}: {hq} query heads are not a multiple of {hkv} KV heads")
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
    if getattr(model_config, "is_hybrid_swa", False) or window or \
            any(t != "full_attention" for t in (getattr(hf, "layer_types", None) or [])):
        raise ConfigError(f"{name} has sliding-window attention layers, which the SGLang "
                          "integration does not serve yet (full-attention models only)")
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf, cap, None):
            raise ConfigError(f"{name}: {cap}={getattr(hf, cap)} is not supported by the hybrid "
                              "kernels")
    scalar = getattr(hf, "query_pre_attn_scalar", None)
    if scalar is not None and not math.isclose(float(scalar), float(D)):
        raise ConfigError(f"{name}: attention scaling query_pre_attn_scalar={scalar} ** -0.5 is "
                          f"not head_dim ** -0.5 (head_dim={D}); the hybrid kernels use the latter")


def check_calibration(cfg: HybridConfig, model_config) -> None:
    """Refuse a `calibration` made for another model: its shapes and its name (the last part of
    `--model-path`; `predictors.calibration.Calibration.check_model`), at start-up."""
    if cfg.calibration is None:
        return
    try:
        cfg.load_calibration().check_model(
            f"HybridConfig.calibration {cfg.calibration!r}", "served model",
            num_layers=int(model_config.num_hidden_layers),
            num_q_heads=int(model_config.num_attention_heads),
            num_kv_heads=int(model_config.num_key_value_heads), head_dim=int(model_config.head_dim),
            name=getattr(model_config, "model_path", None))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cuda_graph_phases(server_args) -> dict[str, str]:
    """The phases for which SGLang will capture CUDA graphs, and how: {"decode": "full", ...}
    (sglang 0.5.17 resolves `--disable-cuda-graph` and `--cuda-graph-backend-*` into
    `cuda_graph_config`; older versions have `disable_cuda_graph` only)."""
    graphs = getattr(server_args, "cuda_graph_config", None)
    if graphs is None or not hasattr(graphs, "decode"):
        return {} if getattr(server_args, "disable_cuda_graph", False) else {"decode": "on"}
    out = {}
    for phase in ("decode", "prefill"):
        backend = str(getattr(getattr(graphs, phase, None), "backend", "disabled"))
        if backend.rsplit(".", 1)[-1].lower() != "disabled":
            out[phase] = backend
    return out


def graphs_allowed(phases: dict[str, str]) -> bool:
    """Whether SGLang may capture these phases' CUDA graphs with the backend: decode graphs of
    backend `full` only (one graph per batch size over fixed-shape whole steps; prefill graphs and
    breakable decode graphs split the step where the backend cannot)."""
    full = phases.get("decode", "").rsplit(".", 1)[-1].lower() in ("full", "on")
    return full and set(phases) == {"decode"}


def check_graph_flow(captures: bool, flow: str, phases: dict[str, str], device: str) -> None:
    """Refuse, at start-up, a flow whose page selection cannot run inside SGLang's decode CUDA
    graphs (`captures` False: `HybridAttention.selection_captures`, no fused indexer kernel on the
    device), while those graphs are on (`phases`)."""
    if device == "cpu" or "decode" not in phases or captures:
        return
    raise ConfigError(f"flow {flow!r} has no fused indexer kernel on {device}, so its page "
                      "selection cannot run inside SGLang's decode CUDA graphs (the flow "
                      "interpreter synchronises): pass --disable-cuda-graph, or pick a flow "
                      "with one (quest, centroid, lowbit with its default options)")


def check_server_args(server_args) -> None:
    """Refuse SGLang settings the backend does not run with (one-line reasons naming the flag)."""
    device = str(getattr(server_args, "device", "cuda") or "cuda")
    phases = cuda_graph_phases(server_args)
    if device != "cpu" and phases and not graphs_allowed(phases):
        raise ConfigError(f"{CUDA_GRAPH_REFUSAL} (on now: {phases})")
    for flag, value in (("--enable-piecewise-cuda-graph",
                         getattr(server_args, "enable_piecewise_cuda_graph", False)),
                        ("--enable-mixed-chunk", getattr(server_args, "enable_mixed_chunk", False)),
                        ("--speculative-algorithm",
                         getattr(server_args, "speculative_algorithm", None)),
                        ("--enable-dp-attention",
                         getattr(server_args, "enable_dp_attention", False))):
        if value:
            raise ConfigError(f"{flag} ({value!r}) is not supported with --attention-backend "
                              "vortex_hybrid; leave it out")
    for flag, name in (("--tp-size", "tp_size"), ("--pp-size", "pp_size"),
                       ("--dp-size", "dp_size")):
        value = getattr(server_args, name, 1) or 1
        if value != 1:
            raise ConfigError(f"{flag} {value} is not supported yet with --attention-backend "
                              "vortex_hybrid (one GPU per engine); use 1")
    for name in ("prefill_attention_backend", "decode_attention_backend"):
        value = getattr(server_args, name, None)
        if value not in (None, BACKEND_NAME):
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} with --attention-backend "
                              f"vortex_hybrid: leave it out (the backend runs prefill and decode)")


def resolve(server_args, text: Optional[str], model_config=None) -> HybridConfig:
    """The checked `HybridConfig` of `text` for these SGLang settings: the JSON, SGLang's flags,
    then the model and the calibration's fit to it (`model_config`: SGLang's `ModelConfig`, built
    from server_args when None)."""
    fields = load(text)
    check_server_args(server_args)
    cfg = build(fields, int(getattr(server_args, "page_size", None) or 1),
                fields.get("kv_dtype") or sglang_kv_dtype(server_args))
    if model_config is None:
        from sglang.srt.configs.model_config import ModelConfig
        model_config = ModelConfig.from_server_args(server_args)
    check_model(model_config)
    check_calibration(cfg, model_config)
    return cfg


def to_text(cfg: HybridConfig) -> str:
    """The canonical JSON of a resolved config (what travels to the scheduler processes)."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


def from_text(text: str) -> HybridConfig:
    return HybridConfig.from_dict(json.loads(text))


__all__ = ["BACKEND_NAME", "CUDA_GRAPH_REFUSAL", "ConfigError", "build", "check_calibration",
           "check_graph_flow", "check_model", "check_server_args", "from_text",
           "load", "resolve", "to_text"]
