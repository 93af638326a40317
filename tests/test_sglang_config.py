"""The SGLang integration's pieces that need no SGLang: the package imports without sglang, the
start-up checks refuse what the backend does not run with (one line naming the value and the fix),
and `RequestMap` ties runtime requests to SGLang's recycled request-pool rows. (With real SGLang:
tests/with_sglang/.)"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from vortex_hybrid import HybridAttention, HybridConfig
from vortex_hybrid.integrations.sglang.config import (ConfigError, build, check_graph_flow,
                                                      check_model,
                                                      check_server_args, load, resolve,
                                                      sglang_kv_dtype)
from vortex_hybrid.integrations.sglang.request_map import RequestMap


def test_the_integration_imports_without_sglang():
    code = ("import sys; "
            "import vortex_hybrid.integrations.sglang.plugin, "
            "vortex_hybrid.integrations.sglang.request_map; "
            "assert 'sglang' not in sys.modules, 'imported sglang'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def server_args(**kw):
    base = dict(device="cuda", disable_cuda_graph=True, cuda_graph_config=None, tp_size=1,
                pp_size=1, dp_size=1, enable_mixed_chunk=False, speculative_algorithm=None,
                enable_dp_attention=False, enable_piecewise_cuda_graph=False, page_size=16,
                kv_cache_dtype="auto", dtype="auto", attention_backend="vortex_hybrid",
                prefill_attention_backend=None, decode_attention_backend=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize("kw, pattern", [
    ({"disable_cuda_graph": False,
      "cuda_graph_config": types.SimpleNamespace(decode=types.SimpleNamespace(backend="full"),
                                                 prefill=types.SimpleNamespace(backend="breakable"))},
     r"pass --disable-prefill-cuda-graph"),
    ({"disable_cuda_graph": True,
      "cuda_graph_config": types.SimpleNamespace(decode=types.SimpleNamespace(backend="breakable"),
                                                 prefill=types.SimpleNamespace(backend="disabled"))},
     r"on now: \{'decode': 'breakable'\}"),
    ({"tp_size": 2}, r"--tp-size 2 is not supported yet"),
    ({"enable_mixed_chunk": True}, r"--enable-mixed-chunk \(True\) is not supported"),
    ({"speculative_algorithm": "EAGLE"}, r"--speculative-algorithm \('EAGLE'\)"),
    ({"decode_attention_backend": "triton"}, r"--decode-attention-backend 'triton'"),
    ({"kv_cache_dtype": "fp8_e4m3"}, r"--kv-cache-dtype 'fp8_e4m3' is not supported"),
])
def test_sglang_settings_the_backend_does_not_run_with_are_refused(kw, pattern):
    args = server_args(**kw)
    with pytest.raises(ConfigError, match=pattern):
        check_server_args(args)
        sglang_kv_dtype(args)


def graphs(decode: str, prefill: str = "disabled"):
    return types.SimpleNamespace(decode=types.SimpleNamespace(backend=decode),
                                 prefill=types.SimpleNamespace(backend=prefill))


@pytest.mark.parametrize("config, allowed", [
    (graphs("full"), True),
    (None, True),                   # a version without cuda_graph_config: decode graphs only
    (graphs("breakable"), False),
    (graphs("full", "full"), False),
    (graphs("full", "breakable"), False),
])
def test_full_decode_graphs_pass_and_other_graphs_stay_one_line_refusals(config, allowed):
    """SGLang's full decode graphs run with the backend (its graph hooks); breakable decode graphs
    and prefill graphs are refused in one line naming both fixes."""
    args = server_args(disable_cuda_graph=False, cuda_graph_config=config)
    if allowed:
        check_server_args(args)
        return
    with pytest.raises(ConfigError) as err:
        check_server_args(args)
    msg = str(err.value)
    assert "\n" not in msg and "--disable-cuda-graph" in msg
    assert "--disable-prefill-cuda-graph" in msg


def test_cpu_engines_need_no_cuda_graph_flag_and_the_kv_dtype_follows_sglang():
    check_server_args(server_args(device="cpu", disable_cuda_graph=False))
    assert sglang_kv_dtype(server_args(dtype="float32")) == "float32"
    assert sglang_kv_dtype(server_args(dtype="half")) == "float16"
    assert sglang_kv_dtype(server_args(kv_cache_dtype="bf16", dtype="float32")) == "bfloat16"


def test_page_size_follows_sglang_unless_given_and_must_then_agree():
    assert build({}, 4, "float32").page_size == 4
    assert build({"page_size": 8}, 8, "float32").page_size == 8
    with pytest.raises(ConfigError, match=r"page_size=8 differs from SGLang's --page-size 4: "
                                          r"pass --page-size 8"):
        build({"page_size": 8}, 4, "float32")


def test_config_text_errors_name_the_value(tmp_path):
    assert load(None) == {} and load("  ") == {}
    path = tmp_path / "c.json"
    path.write_text('{"placement": "cpu"}')
    assert load(str(path)) == {"placement": "cpu"}
    with pytest.raises(ConfigError, match=r"^vortex_hybrid: --vortex-hybrid-config '\[1\]': .*"
                                          r"expected an object"):
        load("[1]")
    with pytest.raises(ConfigError, match=r"HybridConfig.placement='gpux' is invalid"):
        load('{"placement": "gpux"}')


def model_config(**kw):
    hf = types.SimpleNamespace(**kw.pop("hf", {}))
    base = dict(attention_arch="MHA", head_dim=64, v_head_dim=64, num_attention_heads=8,
                num_key_value_heads=2, num_hidden_layers=2, model_path="/models/Llama-3.1-8B",
                is_hybrid_swa=False, hf_text_config=hf,
                hf_config=types.SimpleNamespace(architectures=["LlamaForCausalLM"]))
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize("kw, pattern", [
    ({"attention_arch": "MLA"}, r"multi-head latent attention \(MLA\)"),
    ({"head_dim": 512, "v_head_dim": 512}, r"head_dim=512 is not supported"),
    ({"v_head_dim": 32}, r"value head size 32 differs from head_dim 64"),
    ({"num_key_value_heads": 3}, r"8 query heads are not a multiple of 3 KV heads"),
    ({"hf": {"sliding_window": 4096}}, r"sliding-window attention"),
    ({"hf": {"attn_logit_softcapping": 50.0}}, r"attn_logit_softcapping=50.0"),
    ({"hf": {"query_pre_attn_scalar": 144}}, r"query_pre_attn_scalar=144"),
])
def test_models_the_kernels_do_not_serve_are_refused(kw, pattern):
    check_model(model_config())
    with pytest.raises(ConfigError, match=pattern):
        check_model(model_config(**kw))


@pytest.mark.parametrize("kw, pattern", [
    ({}, None),
    ({"model_path": "meta-llama/Llama-3.1-8B"}, None),       # the same name from the hub
    ({"model_path": "/models/Llama-3-8B"}, r"was made with model='Llama-3.1-8B', but the served "
                                           r"model has model='Llama-3-8B'; re-run"),
    ({"num_hidden_layers": 3}, r"num_layers=2, but the served model has num_layers=3"),
    ({"head_dim": 128, "v_head_dim": 128}, r"head_dim=64, but the served model has head_dim=128"),
])
def test_a_calibration_for_another_model_is_refused_at_start_up(tmp_path, kw, pattern):
    import json
    from vortex_hybrid.predictors.calibration import FORMAT, VERSION
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({
        "format": FORMAT, "version": VERSION, "flow": "quest", "page_size": 16, "sink_pages": 1,
        "recent_pages": 2, "error_target": 0.1, "budgets": [[0.1, 0.2]] * 2,
        "granularity": [["page"] * 2] * 2, "model": {"name": "Llama-3.1-8B", "num_layers": 2,
                                                     "num_q_heads": 8, "num_kv_heads": 2,
                                                     "head_dim": 64}}))
    text = json.dumps({"calibration": str(path)})
    if pattern is None:
        assert resolve(server_args(), text, model_config(**kw)).calibration == str(path)
        return
    with pytest.raises(ConfigError, match=pattern) as err:
        resolve(server_args(), text, model_config(**kw))
    assert "\n" not in str(err.value)


L, HKV, D, P = 2, 2, 8, 4


def test_request_map_follows_recycled_rows_chunks_and_frees():
    """A row's runtime request holds exactly the SGLang request's tokens: appended chunk by chunk,
    replaced when the row's generation changes (a recycled row) or when it holds more than asked,
    removed when the row is freed."""
    runtime = HybridAttention(HybridConfig(page_size=P, placement="gpu", kv_dtype="float32",
                                           budget_ratio=1.0), L, 4, HKV, D, device_pages=64)
    gen = torch.Generator().manual_seed(11)
    print("seed 11")
    dev = runtime.device                                  # SGLang's KV pool is on the runtime's
    pool = {row: torch.randn(2, L, 40, HKV, D, generator=gen).to(dev) for row in (1, 2)}
    reads = []

    def reader(row):
        def read(start, end):
            reads.append((row, start, end))
            return pool[row][0][:, start:end], pool[row][1][:, start:end]
        return read

    m = RequestMap(runtime)
    a = m.sync(1, 1, 9, reader(1))
    assert m.sync(1, 1, 17, reader(1)) == a and reads[-1] == (1, 9, 17)     # next chunk
    assert m.sync(1, 1, 17, reader(1)) == a and len(reads) == 2             # steady state
    k, _ = runtime.kv.read(a, 1)
    torch.testing.assert_close(k, pool[1][0][1, :17].cpu())          # kv.read: on the CPU
    pool[1] = torch.randn(2, L, 40, HKV, D, generator=gen).to(dev)           # row 1 recycled
    b = m.sync(1, 2, 17, reader(1))
    assert b != a and a not in runtime.kv.request_ids and reads[-1] == (1, 0, 17)
    torch.testing.assert_close(runtime.kv.read(b, 0)[0], pool[1][0][0, :17].cpu())
    c = m.sync(2, 1, 5, reader(2))
    assert m.sync(2, 1, 3, reader(2)) not in (c, b)                         # holds more: replaced
    m.freed(1)
    assert b in runtime.kv.request_ids                                     # until between steps
    m.drop_freed()
    assert b not in runtime.kv.request_ids and len(m) == 1
    m.clear()
    assert runtime.kv.request_ids == []


@pytest.mark.parametrize("placement", ["gpu", "hybrid"])
def test_sglang_is_promised_one_page_less_when_its_decode_graphs_take_the_padding_page(placement):
    """When SGLang will capture decode graphs (a CUDA engine with them on), the fixed-shape steps'
    scratch page is not promised to SGLang: `gpu` one page fewer tokens, `hybrid` one request fewer
    (its tail pages); CPU engines and --disable-cuda-graph keep it."""
    from vortex_hybrid.integrations.sglang.sizing import graph_pages, max_requests_of, tokens_of
    cfg = HybridConfig(page_size=16, placement=placement)
    mem = types.SimpleNamespace(device_pages=100, host_pages=1000, gpu_cache_pages=40)
    assert graph_pages(server_args(disable_cuda_graph=False, cuda_graph_config=graphs("full"))) == 1
    assert graph_pages(server_args(disable_cuda_graph=True, cuda_graph_config=graphs("disabled"))) == 0
    assert graph_pages(server_args(device="cpu", disable_cuda_graph=False,
                                   cuda_graph_config=graphs("full"))) == 0
    off = (tokens_of(cfg, mem, 0), max_requests_of(cfg, mem, 0))
    on = (tokens_of(cfg, mem, 1), max_requests_of(cfg, mem, 1))
    if placement == "gpu":
        assert (off[0] - on[0], off[1], on[1]) == (16, None, None)
    else:
        assert (off[0], off[1] - on[1]) == (on[0], 1)


def test_a_flow_without_a_fused_indexer_is_refused_when_decode_graphs_are_on():
    """At start-up (the backend, with its runtime built): a flow the interpreter runs (`lowbit`
    with 3 bits: its fused kernels serve the default 2 bits only) cannot run inside SGLang's decode
    CUDA graphs, so on CUDA with those graphs on it is refused in one line naming the flow and
    --disable-cuda-graph; a flow with a kernel (`quest`, the default `lowbit`), graphs off, a CPU
    engine and `dense` pass. The kernels' presence is read from the runtime's bound flow (here the
    CPU backend's, which mirrors the GPU one's)."""
    bound, captures = {}, {}
    for flow, bits, placement in (("quest", None, "gpu"), ("lowbit", 2, "gpu"),
                                  ("lowbit", 3, "gpu"), ("lowbit", 3, "dense")):
        cfg = HybridConfig(page_size=16, flow=flow, placement=placement, budget_ratio=0.05,
                           extra={} if bits is None else {"bits": bits})
        attn = HybridAttention(cfg, 2, 4, 2, 16, device_pages=16, device=torch.device("cpu"))
        if placement == "gpu":
            bound[flow, bits] = attn.store.bound.indexer_kernel
        captures[flow, bits, placement] = attn.selection_captures
        attn.close()
    assert bound["quest", None] is not None and bound["lowbit", 2] is not None
    assert bound["lowbit", 3] is None
    on = {"decode": "full"}
    with pytest.raises(ConfigError, match=r"flow 'lowbit' has no fused indexer kernel on cuda.*"
                                          r"--disable-cuda-graph"):
        check_graph_flow(captures["lowbit", 3, "gpu"], "lowbit", on, "cuda")
    check_graph_flow(captures["quest", None, "gpu"], "quest", on, "cuda")
    check_graph_flow(captures["lowbit", 2, "gpu"], "lowbit", on, "cuda")      # its fused kernels
    check_graph_flow(captures["lowbit", 3, "gpu"], "lowbit", {}, "cuda")      # graphs off
    check_graph_flow(captures["lowbit", 3, "gpu"], "lowbit", on, "cpu")       # a CPU engine
    check_graph_flow(captures["lowbit", 3, "dense"], "lowbit", on, "cuda")    # selects nothing


def test_the_plugins_default_hbm_stays_within_sglangs_own_kv_budget():
    """gpu_memory_gib None: the runtime and the staging area take no more HBM than SGLang would
    have given its own pool (its activations keep their room); never more than the memory
    model's default; a set gpu_memory_gib is kept; a budget that cannot hold the staging area is
    one ConfigError naming both sizes."""
    from vortex_hybrid.integrations.sglang.config import ConfigError
    from vortex_hybrid.integrations.sglang.sizing import within_sglang
    from vortex_hybrid.kv.page_pool import GIB
    cfg = HybridConfig(placement="hybrid", gpu_reserve_gib=4.0)
    free, staging = 60 * GIB, 5 * GIB                 # free: the staging area already out
    got = within_sglang(cfg, free, 50 * GIB, staging)
    assert got.gpu_memory_gib == 45.0 and got.placement == "hybrid"
    assert within_sglang(cfg, free, 70 * GIB, staging) is cfg          # the default is smaller
    assert within_sglang(cfg, free, None, staging) is cfg              # SGLang's size unknown
    fixed = HybridConfig(placement="gpu", gpu_memory_gib=12.0)
    assert within_sglang(fixed, free, 20 * GIB, staging) is fixed
    with pytest.raises(ConfigError, match=r"KV budget \(4\.00 GiB.*staging area \(5\.00 GiB\)"):
        within_sglang(cfg, free, 4 * GIB, staging)
