"""benchmarks/e2e_decode.py end to end on its smoke shapes (CPU): at full budget every sparse
placement attends every page, so `gpu` and `hybrid` decode the same tokens, step by step, with the
same logits as `dense`; at 5% they read fewer KV bytes; bad options exit 2 with one line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e_decode.py"


def load():
    if "e2e_decode" not in sys.modules:          # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("e2e_decode", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["e2e_decode"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["e2e_decode"]


def test_full_budget_gpu_and_hybrid_decode_the_same_tokens_and_logits_as_dense(tmp_path):
    res = load().main(["--smoke", "--budget", "1", "--steps", "4", "--out", str(tmp_path)])
    by = {r["mode"]: r for r in res["modes"]}
    assert sorted(by) == ["dense", "gpu", "hybrid"], res["skipped"]
    dense = by["dense"]
    assert len(dense["tokens"]) == 5 and len(dense["tokens"][0]) == 2       # warm-up 1 + 4 steps
    assert len({t for step in dense["tokens"] for t in step}) > 1, dense["tokens"]  # not constant
    for mode in ("gpu", "hybrid"):
        assert by[mode]["tokens"] == dense["tokens"], mode
        torch.testing.assert_close(by[mode]["logits"], dense["logits"], rtol=1e-4, atol=1e-4)
        assert by[mode]["kv_bytes_per_token"] == pytest.approx(dense["kv_bytes_per_token"])
    assert by["hybrid"]["cpu_bytes_per_step"] > 0          # host pages were attended by the CPU
    saved = json.loads((tmp_path / "e2e_decode.json").read_text())
    assert [r["mode"] for r in saved["modes"]] == ["dense", "gpu", "hybrid"]
    assert saved["modes"][0]["vs_dense"] == pytest.approx(1.0)
    assert "| hybrid |" in (tmp_path / "e2e_decode.md").read_text()


@pytest.mark.parametrize("locality", ["flow", "real"])
def test_micro_batches_decode_the_tokens_of_one_batch(tmp_path, locality):
    """--micro-batches 2 (two runtimes, the step staggered by a layer, one CPU worker) decodes
    token for token what one runtime decodes for the whole batch (at 50%: selections differ per
    row), with --overlap-back too, and in `cpu` reads the same host bytes (hybrid's two half
    caches split differently)."""
    common = ["--smoke", "--modes", "hybrid,cpu", "--batch", "3", "--steps", "3",
              "--locality", locality, "--budget", "0.5"]      # selections with choices per row
    one = load().main(common + ["--out", str(tmp_path / "one")])
    two = load().main(common + ["--micro-batches", "2", "--out", str(tmp_path / "two")])
    over = load().main(common + ["--micro-batches", "2", "--overlap-back",     # CUDA: the back
                                 "--out", str(tmp_path / "over")])            # parts on streams
    assert over["args"]["overlap_back"] and not two["args"]["overlap_back"]
    for a, b in zip(one["modes"], over["modes"]):
        assert b["tokens"] == a["tokens"], b["mode"]
    for a, b in zip(one["modes"], two["modes"]):
        assert b["micro_batches"] == [2, 1] and a["micro_batches"] == [3], b["mode"]
        assert b["tokens"] == a["tokens"], b["mode"]
        if b["mode"] == "cpu":       # no page cache: the CPU reads every selected host page
            assert b["cpu_bytes_per_step"] == a["cpu_bytes_per_step"]
    assert two["modes"][1]["cpu_bytes_per_step"] > 0          # cpu: the CPU attended host pages
    assert "3 (2+1)" in (tmp_path / "two" / "e2e_decode.md").read_text()


@pytest.mark.skipif(not Path("/proc/self/numa_maps").exists(), reason="Linux /proc only")
def test_host_diagnostics_read_numa_placement_and_busy_threads():
    """numa_placement counts a freshly zeroed 256 MiB tensor's pages on some node (at least its
    size: its mapping may hold more); busy_threads finds this thread busy over a spin."""
    mod = load()
    t = torch.zeros(64 << 20)                           # 256 MiB of float32, touched
    nodes = mod.numa_placement(t)
    assert nodes and all(k.startswith("N") for k in nodes) and sum(nodes.values()) >= 0.24, nodes
    before, t0 = mod.thread_cpu_s(), time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        pass
    rows = mod.busy_threads(before, mod.thread_cpu_s(), time.perf_counter() - t0)
    assert rows and rows[0]["share"] > 0.3 and rows == sorted(rows, key=lambda r: -r["cpu_s"]), rows


def test_sparse_budget_reads_fewer_kv_bytes_than_dense(tmp_path):
    res = load().main(["--smoke", "--modes", "dense,gpu", "--out", str(tmp_path)])
    by = {r["mode"]: r for r in res["modes"]}
    pages = -(-320 // 16)                          # 5% of 20 pages: the 3-page floor (sink + recent)
    assert by["gpu"]["kv_bytes_per_token"] == pytest.approx(
        by["dense"]["kv_bytes_per_token"] * 3 / pages, rel=0.01)


@pytest.mark.parametrize("args,message", [
    (["--modes", "dense,tpu"], "--modes='dense,tpu': allowed are dense,gpu,hybrid,cpu,offload"),
    (["--batch", "hybrid=100000000"], "--batch hybrid=100000000 does not fit"),
    (["--budget", "0"], "--budget=0.0 must lie in (0, 1]"),
    (["--context", "40"], "--context=40 leaves 36 prompt tokens"),
    (["--flow", "qeust"], "did you mean 'quest'?"),
    (["--micro-batches", "0"], "--micro-batches=0 must be a positive integer"),
])
def test_bad_option_gives_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        load().main(["--smoke", "--out", str(tmp_path), *args])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_the_command_line_exits_2_on_a_bad_mode():
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--modes", "tpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --modes='tpu': allowed are dense,gpu,hybrid,cpu,offload"], out.stderr


def test_the_decoder_step_equals_transformers_llama_over_the_same_kv():
    """The benchmark's hand-written decoder is a Llama: one step over a KV cache (dense placement)
    gives the logits of transformers' LlamaForCausalLM with the same weights and the same cache."""
    transformers = pytest.importorskip("transformers")
    from vortex_hybrid import HybridAttention, HybridConfig
    e2e = load()
    s = e2e.Shape(2, 64, 4, 2, 16, 128, 256)
    m = e2e.Decoder(s, torch.float32, torch.device("cpu"), seed=3)
    B, T = 2, 40
    keys = [torch.randn(s.layers, T, s.kv_heads, s.head_dim) for _ in range(B)]
    attn = HybridAttention(HybridConfig(placement="dense", kv_dtype="float32"), s.layers, s.heads,
                           s.kv_heads, s.head_dim, device_pages=B * 8, device="cpu")
    rids = [attn.add_request(k, k) for k in keys]
    st = e2e.DecodeStep(m, B)
    ids = torch.tensor([5, 17])
    st.start(ids, torch.full((B,), T))
    e2e.decode_step(attn, rids, st)
    attn.close()

    cfg = transformers.LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.inter,
                                   num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                   num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                                   rope_theta=s.rope_theta, rms_norm_eps=s.eps,
                                   tie_word_embeddings=False, max_position_embeddings=4096)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": m.embed, "model.norm.weight": m.norm_f,
          "lm_head.weight": m.lm_head}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        q, k, v = m.wqkv[i].split([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                                   s.kv_heads * s.head_dim])
        gate, up = m.wgu[i].chunk(2)
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": m.wo[i],
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": m.wd[i], p + "input_layernorm.weight": m.norm1[i],
                   p + "post_attention_layernorm.weight": m.norm2[i]})
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    cache = transformers.DynamicCache(config=cfg)
    for i in range(s.layers):
        k = torch.stack([kk[i] for kk in keys]).transpose(1, 2)         # [B, Hkv, T, D], post-RoPE
        cache.update(k, k, i)
    with torch.no_grad():
        out = hf(input_ids=ids[:, None], past_key_values=cache, position_ids=torch.full((B, 1), T),
                 cache_position=torch.tensor([T]))
    torch.testing.assert_close(st.logits, out.logits[:, -1].float(), rtol=1e-4, atol=1e-4)
    assert st.ids.tolist() == out.logits[:, -1].argmax(-1).tolist()
    assert st.pos.tolist() == [T + 1] * B


def test_deferred_finishes_decode_the_tokens_of_waiting_ones(tmp_path):
    """--defer-finish (each step completed by the next one's plan(), no sync between steps) gives
    the tokens and logits of steps that wait, in gpu and hybrid."""
    common = ["--smoke", "--modes", "gpu,hybrid", "--steps", "3", "--budget", "0.5"]
    wait = load().main(common + ["--out", str(tmp_path / "wait")])
    defer = load().main(common + ["--defer-finish", "--out", str(tmp_path / "defer")])
    by_wait = {r["mode"]: r for r in wait["modes"]}
    by_defer = {r["mode"]: r for r in defer["modes"]}
    for mode in ("gpu", "hybrid"):
        a, b = by_wait[mode], by_defer[mode]
        assert len(a["tokens"]) == len(b["tokens"]) == 4 and a["tokens"] == b["tokens"], mode
        torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=0)
        assert a["step_ran"] == b["step_ran"]
