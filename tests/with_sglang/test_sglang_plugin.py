"""The plugin inside real SGLang 0.5.17: its own `load_plugins()` finds our entry point, its real
argument parser takes `--attention-backend vortex_hybrid --vortex-hybrid-config ...`, and every bad
config stops it at start-up with our one-line message (the command line: exit code 1 and that
line; `sgl.Engine(...)`: `ConfigError` before any process starts)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from sglang.srt.plugins import load_plugins

from vortex_hybrid.integrations.sglang.config import ConfigError

load_plugins()

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402
from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, prepare_server_args  # noqa: E402
from tiny_llama import edit_config  # noqa: E402


def cli(model, *extra: str) -> list[str]:
    return ["--model-path", str(model), "--device", "cpu", "--skip-tokenizer-init",
            "--attention-backend", "vortex_hybrid", *extra]


def parse_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        prepare_server_args(argv)
    message = str(exc.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_load_plugins_finds_the_entry_point_and_registers_the_backend():
    from importlib.metadata import entry_points
    ep, = [e for e in entry_points(group="sglang.srt.plugins") if e.name == "vortex_hybrid"]
    assert ep.value == "vortex_hybrid.integrations.sglang.plugin:register"
    assert "vortex_hybrid" in ATTENTION_BACKENDS and "vortex_hybrid" in ATTENTION_BACKEND_CHOICES
    args = "sglang.srt.server_args.ServerArgs"
    assert {f"{args}.add_cli_args", f"{args}.from_cli_args", f"{args}.__init__",
            "sglang.srt.utils.common.support_triton"} <= HookRegistry._patched


def test_the_real_parser_takes_the_backend_and_a_config_inline_or_from_a_file(tiny_model, tmp_path):
    inline = prepare_server_args(cli(tiny_model, "--dtype", "float32", "--vortex-hybrid-config",
                                     '{"placement": "gpu", "budget_pages": 8}'))
    cfg = json.loads(inline.vortex_hybrid_config)
    assert (cfg["placement"], cfg["budget_pages"]) == ("gpu", 8)
    assert (cfg["page_size"], cfg["kv_dtype"]) == (1, "float32")       # follow SGLang's
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"placement": "cpu", "page_size": 16, "flow": "centroid"}))
    from_file = prepare_server_args(cli(tiny_model, "--page-size", "16",
                                        "--vortex-hybrid-config", str(path)))
    cfg = json.loads(from_file.vortex_hybrid_config)
    assert (cfg["placement"], cfg["page_size"], cfg["flow"]) == ("cpu", 16, "centroid")
    assert json.loads(prepare_server_args(cli(tiny_model)).vortex_hybrid_config)["placement"] \
        == "hybrid"                                                    # no config: defaults


BAD_CONFIGS = {
    "bad JSON": ('{"placement": "gpu",', [], r"not valid JSON"),
    "unknown flow": ('{"flow": "nope"}', [], r"HybridConfig.flow='nope' is invalid: unknown flow"),
    "unknown field": ('{"budget": 3}', [], r"unknown key 'budget'"),
    "budget below sink + recent": ('{"budget_pages": 2, "budget_ratio": null}', [],
                                   r"budget_pages=2 is invalid: an integer >= sink_pages \+ "
                                   r"recent_pages = 3"),
    "page size differs from SGLang's": ('{"page_size": 16}', ["--page-size", "4"],
                                        r"page_size=16 differs from SGLang's --page-size 4"),
    "missing file": ("/no/such/cfg.json", [], r"cannot read '/no/such/cfg.json'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_the_parser_stops_on_a_bad_config_with_one_line(tiny_model, case):
    text, extra, pattern = BAD_CONFIGS[case]
    message = parse_error(cli(tiny_model, *extra, "--vortex-hybrid-config", text))
    assert message.startswith("vortex_hybrid: ")
    assert re.search(pattern, message), message


MODELS = {
    "head_dim too large": ({"head_dim": 512}, r"head_dim=512 is not supported by the hybrid kernels"),
    "sliding window": ({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                        "sliding_window": 64}, r"sliding-window attention"),
    "MLA": ({"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
             "kv_lora_rank": 32, "q_lora_rank": None, "qk_nope_head_dim": 16,
             "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4,
             "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 2},
            r"multi-head latent attention \(MLA\)"),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_a_model_the_kernels_do_not_serve_is_refused_at_start_up(tiny_model, tmp_path, case):
    changes, pattern = MODELS[case]
    model = edit_config(tiny_model, tmp_path / "model", **changes)
    message = parse_error(cli(model))
    assert re.search(pattern, message), message


def test_server_args_take_the_config_as_a_dict_or_a_hybrid_config(tiny_model):
    from sglang.srt.server_args import ServerArgs

    from vortex_hybrid import HybridConfig
    kw = dict(model_path=str(tiny_model), device="cpu", skip_tokenizer_init=True,
              attention_backend="vortex_hybrid")
    cfg = json.loads(ServerArgs(**kw, vortex_hybrid_config={"placement": "cpu"}).vortex_hybrid_config)
    assert cfg["placement"] == "cpu"
    given = HybridConfig(placement="offload", page_size=1, budget_pages=5, budget_ratio=None)
    cfg = json.loads(ServerArgs(**kw, vortex_hybrid_config=given).vortex_hybrid_config)
    assert (cfg["placement"], cfg["budget_pages"]) == ("offload", 5)
    with pytest.raises(ConfigError, match=r"vortex_hybrid_config=3 must be a JSON file path"):
        ServerArgs(**kw, vortex_hybrid_config=3)


def test_the_config_without_the_backend_is_refused(tiny_model):
    argv = ["--model-path", str(tiny_model), "--device", "cpu", "--skip-tokenizer-init",
            "--attention-backend", "torch_native", "--vortex-hybrid-config", "{}"]
    assert "add --attention-backend vortex_hybrid" in parse_error(argv)


def test_the_engine_refuses_a_bad_config_before_starting_processes(tiny_model):
    import sglang as sgl
    with pytest.raises(ConfigError, match=r"^vortex_hybrid: .*budget_pages=1 is invalid"):
        sgl.Engine(model_path=str(tiny_model), device="cpu", attention_backend="vortex_hybrid",
                   skip_tokenizer_init=True, vortex_hybrid_config='{"budget_pages": 1}')


def test_launch_server_exits_with_our_line_on_a_bad_config(tiny_model):
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server",
                          *cli(tiny_model, "--vortex-hybrid-config", '{"placement": "gpux"}')],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("vortex_hybrid: --vortex-hybrid-config") and \
        "HybridConfig.placement='gpux' is invalid" in last, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
