"""HybridConfig: defaults, budgets, JSON round trips, and one message per kind of bad value."""

import json
import os

import dataclasses

import pytest

from vortex_hybrid import HybridConfig
from vortex_hybrid.config import budget_fields


@pytest.mark.parametrize("kwargs, message", [
    (dict(page_size=12), "page_size=12 is invalid: a power of two"),
    (dict(page_size=0), "page_size=0 is invalid"),
    (dict(page_size=2048), "page_size=2048 is invalid"),
    (dict(page_size=16.0), "page_size=16.0 is invalid"),
    (dict(recent_pages=0), "recent_pages=0 is invalid: at least 1"),
    (dict(sink_pages=-1), "sink_pages=-1 is invalid: a non-negative integer"),
    (dict(budget_pages=2, sink_pages=1, recent_pages=2), "budget_pages=2 is invalid: an integer >= "
                                                         "sink_pages \\+ recent_pages = 3"),
    (dict(budget_ratio=0.0), "budget_ratio=0.0 is invalid: a fraction in \\(0, 1\\]"),
    (dict(budget_ratio=1.5), "budget_ratio=1.5 is invalid"),
    (dict(budget_ratio=0.05, budget_pages=8), "budget_pages=8 is invalid: budget_ratio=0.05 is set "
                                              "too; set exactly one of budget_ratio, budget_pages, "
                                              "budget_tokens \\(the others None\\)"),
    (dict(budget_pages=8, budget_tokens=512), "budget_tokens=512 is invalid: budget_pages=8 is set too"),
    (dict(budget_tokens=0), "budget_tokens=0 is invalid: a positive integer \\(tokens per KV head"),
    (dict(budget_tokens=64.0), "budget_tokens=64.0 is invalid: a positive integer"),
    (dict(budget_tokens="512t"), "budget_tokens='512t' is invalid: a positive integer"),
    (dict(placement="tpu"), "placement='tpu' is invalid: one of \\['hybrid', 'gpu', 'cpu', 'offload', 'dense'\\]"),
    (dict(gpu_cache_pages=-5), "gpu_cache_pages=-5 is invalid: a non-negative integer"),
    (dict(host_memory_gib=-1.0), "host_memory_gib=-1.0 is invalid: a positive finite number"),
    (dict(kv_dtype="int8"), "kv_dtype='int8' is invalid: one of"),
    (dict(summary_dtype="float16"), "summary_dtype='float16' is invalid: one of \\[.float32., .bfloat16., .float8_e4m3fn.\\]"),
    (dict(summary_location="gpu"), "summary_location='gpu' is invalid: one of"),
    (dict(step_shape="neo"), "step_shape='neo' is invalid: one of"),
    (dict(cpu_threads=0), "cpu_threads=0 is invalid: a positive integer, or None"),
    (dict(fetch_share=0.0), "fetch_share=0.0 is invalid: a fraction in \\(0, 1\\]"),
    (dict(fetch_programs=0), "fetch_programs=0 is invalid: a positive integer"),
    (dict(fetch_programs=2.5), "fetch_programs=2.5 is invalid"),
    (dict(fetch_programs=True), "fetch_programs=True is invalid"),
    (dict(fetch_share=1.5), "fetch_share=1.5 is invalid"),
    (dict(fetch_share=True), "fetch_share=True is invalid"),
    (dict(fetch_share=float("nan")), "fetch_share=nan is invalid"),
    (dict(flow=""), "flow='' is invalid"),
])
def test_bad_values_are_rejected_with_field_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HybridConfig(**kwargs)


def test_unknown_json_key_is_named_with_suggestion():
    with pytest.raises(ValueError, match="unknown key 'page_sise' \\(did you mean 'page_size'\\?\\)"):
        HybridConfig.from_json('{"page_sise": 16}')


def test_invalid_json_text_is_reported():
    with pytest.raises(ValueError, match="not valid JSON"):
        HybridConfig.from_json('{"page_size": }')


def test_json_round_trip_through_a_file(tmp_path):
    cfg = HybridConfig(page_size=32, flow="double_sparsity", budget_pages=64, budget_ratio=None,
                       sink_pages=2, recent_pages=4, placement="cpu", gpu_cache_pages=0,
                       host_memory_gib=12.5, kv_dtype="float16", cpu_threads=3,
                       extra={"channels": [0, 3, 5]})
    path = tmp_path / "hybrid.json"
    cfg.to_json(path)
    assert json.loads(path.read_text())["flow"] == "double_sparsity"
    assert HybridConfig.from_json(path) == cfg
    assert HybridConfig.from_dict(cfg.to_dict()) == cfg


def test_config_is_frozen_and_hashable():
    cfg = HybridConfig()
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'page_size'"):
        cfg.page_size = 32
    assert hash(cfg) == hash(HybridConfig())


@pytest.mark.parametrize("pages, ratio, n, expected", [
    (None, 0.02, 8192, 164),   # ceil(0.02 * 8192)
    (None, 0.02, 10, 3),       # floor: sink + recent
    (64, None, 8192, 64),
    (64, None, 40, 64),        # wider than the request: it attends all 40 of its pages
    (None, 0.5, 0, 3),         # never below sink + recent, even for an empty request
    (None, 0.5, 1, 3),
])
def test_budget_for(pages, ratio, n, expected):
    cfg = HybridConfig(budget_pages=pages, budget_ratio=ratio, sink_pages=1, recent_pages=2)
    assert cfg.budget_for(n) == expected


@pytest.mark.parametrize("tokens, page_size, sink, recent, expected", [
    (512, 16, 1, 2, 32),       # whole pages
    (513, 16, 1, 2, 33),       # rounded up to whole pages
    (1, 16, 1, 2, 3),          # floor: sink + recent pages
    (47, 16, 1, 2, 3),         # 3 pages exactly
    (49, 16, 1, 2, 4),
    (100, 32, 4, 4, 8),        # 4 pages, below the floor of 8
    (100, 1, 1, 2, 100),       # page_size 1: tokens are pages
])
def test_budget_tokens_round_up_to_pages_and_never_drop_below_sink_and_recent(
        tokens, page_size, sink, recent, expected):
    cfg = HybridConfig(budget_tokens=tokens, page_size=page_size, sink_pages=sink,
                       recent_pages=recent)
    assert cfg.budget_ratio is None and cfg.budget_pages is None
    for n in (0, 10, 8192):                  # a token budget does not depend on the request's size
        assert cfg.budget_for(n) == expected


def test_no_budget_field_means_the_default_ratio_and_one_field_leaves_the_others_none():
    assert HybridConfig().budget_ratio == HybridConfig(budget_ratio=None).budget_ratio == 0.02
    assert HybridConfig(budget_pages=8).budget_ratio is None
    cfg = HybridConfig(budget_tokens=256)
    assert (cfg.budget_ratio, cfg.budget_pages, cfg.budget_tokens) == (None, None, 256)
    assert HybridConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("text, fields", [
    ("0.05", {"budget_ratio": 0.05}), (" 1 ", {"budget_ratio": 1.0}), (0.1, {"budget_ratio": 0.1}),
    ("1e-2", {"budget_ratio": 0.01}), ("512t", {"budget_tokens": 512}), ("1t", {"budget_tokens": 1}),
])
def test_budget_fields_reads_fractions_and_token_counts(text, fields):
    assert budget_fields(text) == fields
    HybridConfig(**fields)


@pytest.mark.parametrize("text", ["0", "1.5", "2", "-0.1", "nan", "inf", "x", "", "t", "0t", "-5t",
                                  "5.5t", "512T", "512 tokens", "5%"])
def test_budget_fields_rejects_other_text_naming_it_and_the_forms(text):
    with pytest.raises(ValueError, match=f"^budget {text.strip()!r} is invalid: a fraction of a "
                                         "request's pages in \\(0, 1\\] .* or a token count per "
                                         "KV head with a 't' suffix \\(e.g. 512t\\)$"):
        budget_fields(text)


def test_cpu_threads_resolution(monkeypatch):
    assert HybridConfig(cpu_threads=5).resolved_cpu_threads() == 5
    monkeypatch.setenv("NUMBA_NUM_THREADS", "7")
    assert HybridConfig().resolved_cpu_threads() == 7


@pytest.mark.parametrize("kwargs,match", [
    (dict(flow="qeust"), "flow='qeust' is invalid: unknown flow 'qeust' \\(did you mean 'quest'\\?\\)"),
    (dict(flow="double_sparsity", extra={"chanels": 8}),
     "extra has 'chanels' \\(did you mean 'channels'\\?\\), which flow 'double_sparsity' does not"),
    (dict(flow="quest", extra={"channels": 16}), "flow 'quest' does not take: its options are \\[.gqa.\\]"),
    (dict(flow="streaming", extra={"gqa": "max"}), "flow 'streaming' does not take: it takes no options"),
    (dict(flow="missing.py:x"), "flow file 'missing.py' does not exist"),
    (dict(flow="double_sparsity", extra={"channels": 16}),
     "channels=16 must be a non-empty list of channel indices .* use num_channels"),
])
def test_flow_and_its_options_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridConfig(**kwargs)


def test_integral_numbers_are_accepted_and_stored_as_int():
    import numpy as np
    cfg = HybridConfig(budget_pages=np.int64(8), page_size=np.int32(32), sink_pages=np.int64(2))
    assert (cfg.budget_pages, cfg.page_size, cfg.sink_pages) == (8, 32, 2)
    assert all(type(x) is int for x in (cfg.budget_pages, cfg.page_size, cfg.sink_pages))
    with pytest.raises(ValueError, match="page_size=16.0 is invalid"):
        HybridConfig(page_size=16.0)


@pytest.mark.parametrize("source,match", [
    ("[1, 2]", "the JSON is a list; expected an object"),
    ("nope.json", "cannot read 'nope.json'"),
    ("{bad", "not valid JSON"),
])
def test_from_json_errors_say_what_was_wrong(source, match):
    with pytest.raises(ValueError, match=match):
        HybridConfig.from_json(source)


def test_host_memory_gib_and_cpu_threads_do_what_their_docstrings_say(monkeypatch):
    """None: 90% of the available host memory (injected here) and the cores less one (capped at
    Numba's pool); a host_memory_gib: as many pages as fit; dense and gpu: no host pool
    (docs/runtime.md)."""
    import types

    from vortex_hybrid import HybridAttention, cpu_kernels
    from vortex_hybrid.kv.page_pool import GIB
    from vortex_hybrid.runtime import hybrid_attention
    page_bytes = 2 * 2 * 16 * 8 * 4 * 2          # layers x KV heads x page x head_dim x fp32 x K, V
    available = 1 << 30
    monkeypatch.setattr(hybrid_attention.psutil, "virtual_memory",
                        lambda: types.SimpleNamespace(available=available))
    before = cpu_kernels.cpu_threads()
    try:
        for placement, gib, pages in (("cpu", None, int(0.9 * available) // page_bytes),
                                      ("gpu", None, 0),
                                      ("offload", 0.001, int(0.001 * GIB) // page_bytes)):
            cfg = HybridConfig(placement=placement, gpu_cache_pages=5, host_memory_gib=gib,
                               kv_dtype="float32", gpu_memory_gib=0.01)
            attn = HybridAttention(cfg, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8)
            assert attn.kv.host_pool.num_pages == pages, placement
            attn.close()
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        cpu_kernels.set_cpu_threads(2)
        HybridAttention(HybridConfig(placement="cpu", gpu_memory_gib=0.01), 1, 2, 2, 8).close()
        assert cpu_kernels.cpu_threads() == 1                   # 2 cores less the driving one
        cpu_kernels.set_cpu_threads(1)
        HybridAttention(HybridConfig(placement="cpu", cpu_threads=2, gpu_memory_gib=0.01), 1, 2, 2,
                        8).close()
        assert cpu_kernels.cpu_threads() == min(2, cpu_kernels.threads.max_threads())
    finally:
        cpu_kernels.set_cpu_threads(before)
