"""benchmarks/sglang_e2e.py runs end to end (here on the CPU, at tiny sizes: SGLang's triton backend
under the Triton interpreter): its JSON holds every run, and at full budget `vortex_hybrid`'s greedy
output equals SGLang's `triton` backend's, request for request (and `--check` says so). Each engine
runs in a process of its own, so a run whose engine cannot start fails alone; `--batch auto` submits
as many requests as SGLang admits from its capacity; `--kv-gib` sizes SGLang's pool exactly;
`--load-format dummy` starts engines on a config without weights; `--time-limit` skips what would
overrun and `--resume` keeps what finished. The pure parts (sizing, admission, timing, the 8B shape)
are unit-tested."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "sglang_e2e.py"


def _load():
    spec = importlib.util.spec_from_file_location("sglang_e2e_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


e2e = _load()


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_the_benchmark_runs_and_full_budget_agrees_with_triton(tmp_path):
    args = ["--out", str(tmp_path), "--runs", "triton,hybrid@full", "--batch", "2",
            "--context", "96", "--new", "3", "--layers", "2", "--chunk", "64", "--check"]
    out = _run(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "sglang_e2e.json").read_text())
    runs = {r["run"]: r for r in result["runs"]}
    assert set(runs) == {"triton", "hybrid@full"}, [r.get("error") for r in result["runs"]]
    assert runs["hybrid@full"]["same_as_triton"] == 2
    assert runs["hybrid@full"]["output_ids"] == runs["triton"]["output_ids"]
    assert "TPOT vs triton" in out.stdout.splitlines()[-5]
    assert out.stdout.splitlines()[-1].startswith("sglang_e2e --check: every run finished")


def test_auto_batch_admits_what_sglang_holds_and_a_failed_start_fails_alone(tmp_path):
    """KV limited to 0.00132 GiB (float32 KV of 2 layers, 2 KiB a token: 688 tokens, whole pages):
    triton's pool is exactly that and it admits 3 requests of 200 + 2 tokens (227 tokens each to
    admit: 13 pages, the new tokens, a page of overhead and a token of reserve), all decoding at
    once; `gpu` admits what its own capacity holds; `hybrid` cannot start (its 256
    tail pages do not fit in that HBM) and fails in its own process while the others report; the
    model is a config without weights (load_format dummy)."""
    kv = 0.00132
    out = _run("--out", str(tmp_path / "a"), "--runs", "triton,hybrid,gpu", "--batch", "auto",
               "--kv-gib", str(kv), "--context", "200", "--new", "2", "--layers", "2",
               "--chunk", "256", "--max-batch", "8", "--load-format", "dummy", "--check")
    assert out.returncode == 1, out.stderr[-3000:]        # --check: the failed run
    assert "hybrid (200, 0.00132)" in out.stderr
    result = json.loads((tmp_path / "a" / "sglang_e2e.json").read_text())
    runs = {r["run"]: r for r in result["runs"]}
    assert list(runs) == ["triton", "hybrid", "gpu"]
    assert runs["hybrid"]["status"] == "error" and "tail pages" in runs["hybrid"]["error"], \
        runs["hybrid"]
    per_token = e2e.bytes_per_token(2, 2, 64, 4)
    tri, gpu = runs["triton"], runs["gpu"]
    assert tri["max_total_num_tokens"] == e2e.kv_tokens(kv, per_token) == 688
    assert tri["engine"]["load_format"] == "dummy"
    for r in (tri, gpu):
        assert r["status"] == "ok", r.get("error")
        assert r["tokens_per_request"] == 208 and r["admission_tokens"] == 227
        assert r["admitted"] == e2e.fit(r["max_total_num_tokens"], 227,
                                        r["max_running_requests"] - 1, 8) == \
            len(r["output_ids"]) == r["concurrency"]
        assert all(len(ids) == 2 for ids in r["output_ids"])
    assert tri["admitted"] == 3 and 1 <= gpu["admitted"] <= 3
    # ours: the plugin's start-up line (capacity = SGLang's tokens; HBM of runtime + staging)
    assert gpu["startup"]["capacity_tokens"] == gpu["max_total_num_tokens"]
    assert gpu["kv_hbm_gib"] > 0 and gpu["kv_host_gib"] == 0
    assert gpu["config"]["gpu_memory_gib"] == kv and "tok_s_vs_triton" in gpu
    assert "KV limited to 0.00132 GiB of HBM" in out.stdout and "vs triton" in out.stdout

    # --resume keeps the finished runs (no engine starts); the failed one would run again, but
    # --time-limit leaves it no time: it is recorded as skipped. At 800 tokens the sizes say that
    # no request fits triton's or gpu's 688 tokens: recorded so, no engine started
    again = _run("--out", str(tmp_path / "b"), "--runs", "triton,hybrid,gpu", "--batch", "auto",
                 "--kv-gib", str(kv), "--context", "200,800", "--new", "2", "--layers", "2",
                 "--chunk", "256", "--max-batch", "8", "--load-format", "dummy",
                 "--resume", str(tmp_path / "a" / "sglang_e2e.json"), "--time-limit", "30",
                 timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    res = json.loads((tmp_path / "b" / "sglang_e2e.json").read_text())
    res = {(r["run"], r["context"]): r for r in res["runs"]}
    assert res["triton", 200]["resumed"] and res["gpu", 200]["resumed"]
    assert res["triton", 200]["output_ids"] == tri["output_ids"]
    for ctx in (200, 800):
        assert res["hybrid", ctx]["status"] == "skipped"
        assert "--time-limit" in res["hybrid", ctx]["reason"]
    for run in ("triton", "gpu"):
        r = res[run, 800]
        assert (r["status"], r["admitted"], r["wall_s"]) == ("no_fit", 0, 0.0), r
        assert "not started" in r["reason"] and r["admission_tokens"] == 819
    assert "no request fits" in again.stdout


def test_the_llama3_8b_shape_is_written_without_weights(tmp_path):
    args = types.SimpleNamespace(shape="llama3-8b", layers=None, hidden=None, intermediate=None)
    model = e2e.write_model(tmp_path / "m", args, weights=False, dtype="bfloat16",
                            max_positions=131072 + 128 + 32)
    cfg = json.loads((model / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"],
            cfg["vocab_size"], cfg["rope_theta"] if "rope_theta" in cfg else
            cfg["rope_parameters"]["rope_theta"]) == (32, 4096, 32, 8, 128, 14336, 128256, 500000)
    assert cfg["max_position_embeddings"] >= 131072 + 128 and cfg["architectures"] == [
        "LlamaForCausalLM"]
    assert not list(model.glob("*.safetensors")) and not list(model.glob("*.bin"))
    geo = e2e.geometry(cfg)
    assert geo["bytes_per_token"] == 131072 and geo["dtype"] == "bfloat16"    # 128 KiB a token
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    assert max(tok.get_vocab().values()) < cfg["vocab_size"]
    cfg = e2e.shape_config("llama3-8b", layers=2, hidden=256, intermediate=512)   # a smoke
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == (2, 256, 128)


def test_kv_gib_sizing_and_admission():
    per_token = e2e.bytes_per_token(32, 8, 128, 2)                # Llama-3-8B, bf16
    assert per_token == 128 * 1024
    assert e2e.kv_tokens(12, per_token) == 98304                  # 12 GiB
    assert e2e.kv_tokens(12, per_token, 16) % 16 == 0
    assert e2e.kv_tokens(0.00132, 2048) == 688
    assert e2e.tokens_per_request(32768, 128) == 32896 and e2e.tokens_per_request(100, 3) == 112
    per_req = e2e.admission_tokens(32768, 128)
    assert per_req == 32768 + 128 + 16 + 1 and e2e.admission_tokens(200, 2) == 227
    assert e2e.fit(98304, per_req) == 2                           # triton at 12 GiB, 32K
    assert e2e.fit(98304, e2e.admission_tokens(131072, 128)) == 0       # nor one at 128K
    assert e2e.fit(688, 227) == 3 and e2e.fit(672, 227) == 2
    assert e2e.fit(10 ** 7, per_req, 64, None) == 64 and e2e.fit(10 ** 7, per_req, 8, 64) == 8
    assert e2e.fit(-5, per_req) == 0
    # the host placements' default: --max-batch requests' KV, at most 75% of what is available
    assert e2e.host_gib_for(4, per_req, per_token, 1 << 40) == pytest.approx(4 * per_req / 8192)
    assert e2e.host_gib_for(64, per_req, per_token, 100 << 30) == pytest.approx(75.0)


def test_engine_keywords_of_each_memory_setting():
    geo = e2e.geometry(e2e.shape_config("llama3-8b"))
    args = types.SimpleNamespace(batch="auto", max_batch=64, new=128, model="/m", shape="llama3-8b",
                                 load_format="dummy", chunk=8192, no_overlap=False, budget=0.05,
                                 cache=0.1, host_gib=None, sglang_graphs=True,
                                 summary_dtype="bfloat16", flow="lowbit")
    host = 100 << 30
    kw, cfg, n = e2e.engine_kwargs("triton", 32768, 12.0, args, True, geo, host)
    assert kw["max_total_tokens"] == 98304 and n == 2 and cfg is None
    assert kw["attention_backend"] == "triton" and kw["cuda_graph_max_bs_decode"] == 64 + 1
    assert kw["context_length"] == 32768 + 128 + 16 and kw["load_format"] == "dummy"
    kw, cfg, n = e2e.engine_kwargs("triton", 32768, None, args, True, geo, host)
    assert "max_total_tokens" not in kw and "mem_fraction_static" not in kw and n is None
    # ours on CUDA: the same 12 GiB, the prefill staging area inside them (65 + 8 rows: 8192 new
    # tokens and two pages a row for each of 32 layers, one 32,912-token prefix; 4 KiB a token
    # and layer)
    staging = (32 * (512 + 2 * 73 + 1) * 16 + 2057 * 16) * 4096 / 2 ** 30
    assert staging == pytest.approx(1.4127, abs=1e-4)
    kw, cfg, n = e2e.engine_kwargs("gpu", 32768, 12.0, args, True, geo, host)
    assert cfg["gpu_memory_gib"] == round(12.0 - staging, 6) and n == 2
    assert kw["disable_prefill_cuda_graph"]
    assert json.loads(kw["vortex_hybrid_config"]) == cfg and cfg["flow"] == "lowbit"
    kw, cfg, n = e2e.engine_kwargs("gpu", 131072, None, args, True, geo, host)
    assert "gpu_reserve_gib" not in cfg and "gpu_memory_gib" not in cfg   # the plugin's sizing
    kw, cfg, n = e2e.engine_kwargs("hybrid", 32768, 12.0, args, True, geo, host)
    assert cfg["gpu_memory_gib"] == round(12.0 - staging, 6)
    assert cfg["host_memory_gib"] == pytest.approx(75.0)
    assert cfg["summary_dtype"] == "bfloat16"
    assert n == e2e.fit(e2e.kv_tokens(75.0, geo["bytes_per_token"]), 32913) == 18
    assert kw["max_running_requests"] == kw["cuda_graph_max_bs_decode"] == 18 + 1
    kw, cfg, n = e2e.engine_kwargs("hybrid@full", 8192, None, types.SimpleNamespace(
        **{**vars(args), "batch": "4", "shape": "tiny"}), False, geo, host)
    assert cfg["budget_ratio"] == 1.0 and "gpu_cache_pages" in cfg and kw["disable_cuda_graph"]
    assert kw["max_total_tokens"] == 4 * (8192 + 128) + 64 * 16 and kw["device"] == "cpu"
    with pytest.raises(SystemExit, match="staging area alone takes 1.41 GiB"):
        e2e.engine_kwargs("hybrid", 32768, 1.0, args, True, geo, host)


def test_the_plugin_leaves_room_for_the_staging_area_and_the_startup_line_parses(monkeypatch):
    """With all of HBM (gpu_memory_gib None) the runtime takes the free HBM less the prefill
    staging area (allocated after it) and the reserve; the start-up line parses."""
    import torch

    from vortex_hybrid.config import HybridConfig
    from vortex_hybrid.integrations.sglang import sizing
    sa = types.SimpleNamespace(max_prefill_tokens=8192, chunked_prefill_size=8192)
    # per layer: the padding page, 8192 new tokens in pages and two pages per row; the earlier
    # chunks of one request in whole pages, one region for every layer
    assert sizing.staging_slots(sa, 131216, 20, 16) == ((512 + 40 + 1) * 16, 8201 * 16)
    assert sizing.staging_slots(sa, 500, None, 16) == ((512 + 2 * 8193 + 1) * 16, 32 * 16)
    assert sizing.staging_bytes(sa, 131216, 20, 16, 32, 4096) == \
        (32 * 553 * 16 + 8201 * 16) * 4096
    free = 60 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, 80 << 30))
    mc = types.SimpleNamespace(num_hidden_layers=32, num_key_value_heads=8, head_dim=128)
    cfg = HybridConfig(placement="gpu", page_size=16, kv_dtype="bfloat16")
    whole = sizing.plan(cfg, mc, "cuda")
    staging = 17 << 30
    left = sizing.plan(cfg, mc, "cuda", staging_bytes=staging)
    assert whole.device_bytes <= free - (4 << 30)
    assert left.device_bytes <= free - staging - (4 << 30) < whole.device_bytes
    mem = types.SimpleNamespace(device_bytes=3 << 30, host_bytes=75 << 30, gpu_cache_pages=1200)
    line = sizing.describe(types.SimpleNamespace(placement="hybrid"), mem, 1 << 29, 614400, 253)
    got = e2e.parse_startup("noise\n[x] " + line + "\nmore")
    assert got == {"placement": "hybrid", "kv_hbm_gib": 3.5, "runtime_hbm_gib": 3.0,
                   "staging_hbm_gib": 0.5, "kv_host_gib": 75.0, "capacity_tokens": 614400,
                   "capacity_requests": 253, "gpu_cache_pages": 1200}
    assert e2e.parse_startup("nothing") is None


def test_the_backends_prefill_time_lines_are_summed():
    """Lines made by the backend's own `_PrefillTimes` (with and without restaging), among other
    log lines, sum to the phases' totals; a log without them gives None."""
    import torch

    from vortex_hybrid.integrations.sglang.backend import _PrefillTimes

    def line(read_back: int, ms: tuple) -> str:
        t = _PrefillTimes(torch.device("cpu"))
        t.read_back = read_back
        t.restage_s = ms[1] / 1e3
        marks = ("start", "staging", "model", "sync into the runtime")
        at = [0.0, ms[0], ms[0] + ms[2], ms[0] + ms[2] + ms[3]]
        t.marks = [(name, a / 1e3) for name, a in zip(marks, at)]
        return t.line(1, 8192)

    first = line(0, (2.0, 0.0, 1500.0, 300.0))
    second = line(8192, (1.0, 250.0, 2000.0, 400.0))
    assert "restaging" not in first and "restaging earlier chunks 250.0 ms" in second
    got = e2e.parse_prefill_times(f"[t] {first}\nother line\n[t] {second}\n")
    assert got == {"batches": 2, "new_tokens": 16384, "read_back_tokens": 8192,
                   "staging_s": 0.003, "model_s": 3.5, "restage_s": 0.25, "sync_s": 0.7}
    assert e2e.parse_prefill_times("nothing") is None


def test_stream_timing_separates_prefill_from_the_decode_window():
    # two requests: first tokens at 1.0 and 2.0 (prefill), then lockstep steps of 0.1 s
    ev = {0: [(1.0, 1)] + [(2.0 + 0.1 * k, 1 + k) for k in range(1, 5)],
          1: [(2.0, 1)] + [(2.0 + 0.1 * k, 1 + k) for k in range(1, 5)]}
    t = e2e.stream_timing(0.0, ev)
    assert t["prefill_s"] == 2.0 and t["concurrency"] == 2 and t["output_tokens"] == 10
    assert t["decode_tokens"] == 8 and t["decode_s"] == pytest.approx(0.4)
    assert t["decode_tok_s"] == pytest.approx(20.0) and t["tpot_ms"] == pytest.approx(100.0)
    # one request finished before the other's first token: no window, said so
    t = e2e.stream_timing(0.0, {0: [(1.0, 1), (1.5, 2)], 1: [(2.0, 1), (2.5, 2)]})
    assert t["decode_tok_s"] is None and "no window" in t["timing"] and t["concurrency"] == 1


def test_time_estimates_and_kv_settings():
    assert e2e.estimate_s([], 32768) == e2e.MIN_RUN_S
    done = [{"context": 32768, "wall_s": 200.0}, {"context": 32768, "wall_s": 90.0}]
    assert e2e.estimate_s(done, 32768) == 200.0
    assert e2e.estimate_s(done, 131072) == 800.0
    # the first Llama-3-8B run's numbers: 2 requests prefilled in 35 s after a 34 s start; a run
    # admitting 22 needs their prefill too
    done = [{"context": 32768, "wall_s": 102.0, "prefill_s": 35.0, "admitted": 2,
             "engine_start_s": 34.0}]
    assert e2e.estimate_s(done, 32768, 22) == pytest.approx(34.0 + 17.5 * 22)
    assert e2e.estimate_s(done, 32768, 1) == 102.0 and e2e.estimate_s(done, 32768) == 102.0
    assert e2e.parse_kv("all,12") == [None, 12.0] and e2e.kv_label(12.0) == "12"
    with pytest.raises(ValueError):
        e2e.parse_kv("0")


def test_a_run_past_its_timeout_is_ended_with_its_processes(tmp_path):
    import psutil
    out = _run("--out", str(tmp_path), "--runs", "gpu", "--context", "96", "--new", "2",
               "--layers", "2", "--load-format", "dummy", "--run-timeout", "4", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "sglang_e2e.json").read_text())["runs"][0]
    assert r["status"] == "error" and "no answer within 4 s" in r["error"], r
    assert r["wall_s"] < 40
    assert not e2e._group_alive(r["pid"])        # the child's process group is gone
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, left


def test_the_png_has_a_bar_per_run_and_cell(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [{"run": run, "context": ctx, "kv_gib": kv, "status": "ok", "decode_tok_s": v,
             "tpot_ms": 10.0, "output_ids": [[1, 2]] * 3}
            for ctx in (32768, 131072) for kv in ("all", "12")
            for run, v in (("triton", 100.0), ("hybrid", 300.0))]
    runs[2] = {"run": "triton", "context": 32768, "kv_gib": "12", "status": "no_fit"}
    result = {"device": "cpu", "args": {"shape": "tiny", "new": 2, "budget": 0.05}, "runs": runs}
    e2e.compare(result)
    assert runs[1]["tok_s_vs_triton"] == 3.0 and "tok_s_vs_triton" not in runs[3]
    assert e2e.plot(result, tmp_path / "p.png") is None
    assert (tmp_path / "p.png").stat().st_size > 1000
