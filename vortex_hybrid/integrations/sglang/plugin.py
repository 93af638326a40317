"""The SGLang plugin: what SGLang's `load_plugins()` runs from our entry point
(`[project.entry-points."sglang.srt.plugins"] vortex_hybrid`), in every SGLang process.

`register()`:
- registers the attention backend `vortex_hybrid` (`register_attention_backend`) and adds it to
  `--attention-backend`'s choices (`add_attention_backend_choices`);
- through SGLang's `HookRegistry`: adds `--vortex-hybrid-config` to SGLang's argument parser
  (`ServerArgs.add_cli_args`, AFTER), carries its value from the parsed arguments into the
  `ServerArgs` (`ServerArgs.from_cli_args`, AROUND), and lets `ServerArgs(...)` (hence
  `sgl.Engine(...)`) take `vortex_hybrid_config=` (a JSON file path or text, a dict of fields or a
  `HybridConfig`; `ServerArgs.__init__`, AROUND). Whenever the
  attention backend is `vortex_hybrid` the config is resolved and checked right there, in the
  process that parses the arguments (`config.resolve`), and stored on the `ServerArgs` as canonical
  JSON (`server_args.vortex_hybrid_config`), which SGLang pickles to its scheduler processes;
- tells SGLang's `support_triton` that this backend needs no Triton helpers on a machine without
  CUDA (`sglang.srt.utils.common.support_triton`, AROUND), so a CPU engine runs without the Triton
  interpreter.

A bad config stops `python -m sglang.launch_server` with one line on stderr and exit code 1, and
makes `sgl.Engine(...)` raise `config.ConfigError` before any process starts.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from typing import Mapping, Optional

from ...config import HybridConfig
from .config import BACKEND_NAME, ConfigError, from_text, resolve, to_text

log = logging.getLogger(__name__)

CONFIG_FLAG = "--vortex-hybrid-config"
CONFIG_FIELD = "vortex_hybrid_config"
"""The `ServerArgs` attribute (and `sgl.Engine` keyword) holding the config."""
_CLI_TEXT: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("vortex_hybrid_cli",
                                                                          default=None)
"""`--vortex-hybrid-config`'s value while `ServerArgs.from_cli_args` builds the `ServerArgs`."""


def register() -> None:
    """The entry point SGLang's `load_plugins()` calls (once per process)."""
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(create_backend)
    args = "sglang.srt.server_args.ServerArgs"
    HookRegistry.register(f"{args}.add_cli_args", _add_cli_args, HookType.AFTER)
    HookRegistry.register(f"{args}.from_cli_args", _from_cli_args, HookType.AROUND)
    HookRegistry.register(f"{args}.__init__", _init, HookType.AROUND)
    HookRegistry.register("sglang.srt.utils.common.support_triton", _support_triton,
                          HookType.AROUND)
    configurator = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
    HookRegistry.register(f"{configurator}._resolve_memory_pool_config", _resolve_pool_config,
                          HookType.AROUND)
    HookRegistry.register(f"{configurator}._build_mha_kv_pool", _build_mha_pool, HookType.AROUND)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.process_batch_result",
                          _process_batch_result, HookType.AROUND)


def _resolve_pool_config(original, self, *args, **kwargs):
    from . import sizing
    return sizing.resolve_pool_config(original, self, *args, **kwargs)


def _build_mha_pool(original, self, *args, **kwargs):
    from . import sizing
    return sizing.build_mha_pool(original, self, *args, **kwargs)


def _process_batch_result(original, self, batch, result):
    from . import sizing
    return sizing.abort_failed(original, self, batch, result)


def create_backend(model_runner):
    """The factory SGLang calls in each scheduler process (`ATTENTION_BACKENDS[name](runner)`)."""
    from .backend import VortexHybridBackend

    server_args = model_runner.server_args
    text = getattr(server_args, CONFIG_FIELD, None)
    cfg = from_text(text) if text else resolve(server_args, None, model_runner.model_config)
    return VortexHybridBackend(model_runner, cfg)


def _add_cli_args(result, parser) -> None:
    parser.add_argument(
        CONFIG_FLAG, type=str, default=None,
        help="vortex-hybrid's settings for --attention-backend vortex_hybrid: a JSON file path or "
             "an inline JSON object of HybridConfig fields (placement, flow, budget_pages, "
             "budget_ratio, sink_pages, recent_pages, gpu_cache_pages, ...); page_size and "
             "kv_dtype follow SGLang when left out.")


def _from_cli_args(original, cls, args):
    text = getattr(args, CONFIG_FIELD, None)
    token = _CLI_TEXT.set(text)
    try:
        server_args = original(cls, args)
        if getattr(server_args, CONFIG_FIELD, None) is None:   # no __init__ hook ran (0.5.21)
            _attach(server_args, text)
        return server_args
    except ConfigError as exc:              # the command line: one line, no traceback
        raise SystemExit(str(exc)) from None
    finally:
        _CLI_TEXT.reset(token)


def _init(original, self, *args, **kwargs) -> None:
    text = kwargs.pop(CONFIG_FIELD, None)
    if text is None:
        text = _CLI_TEXT.get()
    if isinstance(text, HybridConfig):
        text = text.to_json()
    elif isinstance(text, Mapping):
        text = json.dumps(dict(text))
    elif text is not None and not isinstance(text, (str, os.PathLike)):
        raise ConfigError(f"{CONFIG_FIELD}={text!r} must be a JSON file path, a JSON object text, "
                          "a dict of HybridConfig fields or a HybridConfig")
    text = None if text is None else os.fspath(text)
    original(self, *args, **kwargs)
    _attach(self, text)


def _uses_backend(server_args) -> bool:
    return BACKEND_NAME in (getattr(server_args, "attention_backend", None),
                            getattr(server_args, "prefill_attention_backend", None),
                            getattr(server_args, "decode_attention_backend", None))


def _attach(server_args, text: Optional[str]) -> None:
    """Resolve and check the config for these server args, and keep it on them."""
    if not _uses_backend(server_args):
        if text is not None:
            raise ConfigError(f"{CONFIG_FLAG} is set but --attention-backend is "
                              f"{getattr(server_args, 'attention_backend', None)!r}; add "
                              f"--attention-backend {BACKEND_NAME}")
        return
    if str(getattr(server_args, "model_path", "")).lower() in ("none", "dummy"):
        return
    fields = {CONFIG_FIELD: to_text(resolve(server_args, text))}
    if not getattr(server_args, "disable_radix_cache", True):
        log.warning("vortex_hybrid: SGLang's radix (prefix) cache is turned off "
                    "(--disable-radix-cache): the runtime holds the only copy of the KV, so "
                    "SGLang's pool has none for a prefix-cache hit to read")
        fields["disable_radix_cache"] = True
    if hasattr(server_args, "override"):        # sglang 0.5.17+: the resolved args are read-only
        server_args.override(BACKEND_NAME, **fields)
    else:
        for name, value in fields.items():
            setattr(server_args, name, value)


def _support_triton(original, backend: str) -> bool:
    if backend == BACKEND_NAME:
        import torch
        return torch.cuda.is_available()
    return original(backend)
