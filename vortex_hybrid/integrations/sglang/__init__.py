"""SGLang integration: the attention backend `vortex_hybrid`, switched on in SGLang's own
configuration (no patch to SGLang):

    python -m sglang.launch_server --model-path M --attention-backend vortex_hybrid \
        --disable-prefill-cuda-graph --vortex-hybrid-config cfg.json
    sgl.Engine(model_path=M, attention_backend="vortex_hybrid", disable_prefill_cuda_graph=True,
               vortex_hybrid_config='{"placement": "hybrid", "budget_ratio": 0.05}')

SGLang finds the plugin through the `sglang.srt.plugins` entry point `vortex_hybrid`
(`plugin.register`). Modules: `config` (the config and its start-up checks), `plugin` (entry point,
server argument, hooks), `backend` (the `AttentionBackend`), `request_map` (SGLang request-pool rows
-> runtime requests), `sizing` (SGLang's pool sized by the runtime), `shutdown` (`shut_down`: an
engine shut down so that another can start in the same process). Only `backend` imports sglang
at import time; `import vortex_hybrid` never does.
See docs/sglang.md.
"""

from .config import BACKEND_NAME, ConfigError

__all__ = ["BACKEND_NAME", "ConfigError"]
