"""The eval prefills each sample once, alone, and decodes every (mode, flow, budget) from that one
prefill: the packed batch equals a left-padded batched prefill, one evaluation of several
configurations gives what separate evaluations give, and the model sees one prompt-length forward
per sample whatever the number of configurations."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tiny_models import tiny_llama_loaded  # noqa: E402

MODEL_SEED = 88120397415         # fixed: the module fixture is set up before conftest's per-test seed


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    return tiny_llama_loaded(tmp_path_factory.mktemp("tiny") / "llama", MODEL_SEED)


def prompts(tok, n=2):
    from vortex_hybrid.eval import tasks as task_lib
    suite = task_lib.make_suite(["passkey", "niah_single"], tok, 512, n // 2, 0, True)
    seqs = [task_lib.render(s, tok, True) for s in suite]
    assert len({len(s) for s in seqs}) > 1                  # different lengths: padding happens
    return seqs


def test_the_packed_prefill_equals_a_left_padded_batched_prefill(model_and_tokenizer):
    import torch
    import transformers

    from vortex_hybrid.eval.run import prefill_batch
    from vortex_hybrid.integrations.hf import ATTN_IMPLEMENTATION, CACHE_ARGUMENT
    model, tok = model_and_tokenizer
    seqs = prompts(tok)
    (keys, values, mask), first, seconds = prefill_batch(model, seqs)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION        # restored
    T = max(map(len, seqs))
    ids = torch.tensor([[0] * (T - len(x)) + x for x in seqs])
    want_mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in seqs])
    model.config._attn_implementation = "sdpa"
    try:
        with torch.inference_mode():
            dyn = transformers.DynamicCache(config=model.config)
            logits = model(ids, attention_mask=want_mask, **{CACHE_ARGUMENT: dyn}).logits
    finally:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    assert torch.equal(mask, want_mask) and len(seconds) == len(seqs)
    assert torch.equal(first, logits[:, -1:].argmax(-1))
    real = want_mask.bool()
    for i, layer in enumerate(dyn.layers):
        for got, want in ((keys[i], layer.keys), (values[i], layer.values)):
            assert got.shape == want.shape
            assert torch.allclose(got.transpose(1, 2)[real], want.transpose(1, 2)[real],
                                  atol=1e-5, rtol=1e-4)
            assert not got.transpose(1, 2)[~real].any()               # padding is zeros


def test_one_prefill_per_sample_serves_every_configuration(model_and_tokenizer, monkeypatch):
    """Several modes, flows and budgets in one evaluation: one prompt-length forward per sample,
    and every run's output equal to that of an evaluation of its configuration alone."""
    from vortex_hybrid.eval.run import EvalSpec, evaluate
    model, tok = model_and_tokenizer
    prompt_forwards = []
    real_forward = type(model).forward

    def forward(self, input_ids=None, *a, **kw):
        if input_ids is not None and input_ids.shape[1] > 1:
            prompt_forwards.append(tuple(input_ids.shape))
        return real_forward(self, input_ids, *a, **kw)

    monkeypatch.setattr(type(model), "forward", forward)
    common = dict(tasks=["passkey", "niah_single"], context=512, samples=2, max_new_tokens=5,
                  batch=2, warmup=False)
    configs = [(["dense"], ["quest"], ["1.0"]), (["gpu"], ["quest"], ["0.25"]),
               (["gpu"], ["centroid"], ["96t"]), (["streaming"], ["quest"], ["0.25"])]
    together = evaluate(model, tok, EvalSpec(
        modes=["dense", "gpu", "streaming"], flows=["quest", "centroid"],
        budgets=["0.25", "96t"], **common), chat=True)["runs"]
    assert len(prompt_forwards) == 4 and all(s[0] == 1 for s in prompt_forwards)  # 4 samples
    key = lambda r: (r["task"], r["sample"], r["mode"], r["flow"], r["budget"])   # noqa: E731
    got = {key(r): r["output"] for r in together}
    assert len(got) == 4 * (1 + 2 * 2 + 2)
    for modes, flows, budgets in configs:
        alone = evaluate(model, tok, EvalSpec(modes=modes, flows=flows, budgets=budgets, **common),
                         chat=True)["runs"]
        for r in alone:
            assert got[key(r)] == r["output"], key(r)


def test_without_warmup_each_configuration_decodes_once_per_batch(model_and_tokenizer, monkeypatch):
    from vortex_hybrid.eval import run as run_mod
    model, tok = model_and_tokenizer
    calls, real = [], run_mod.decode_run

    def decode_run(*a, **kw):
        calls.append(a[4])                                      # max_new
        return real(*a, **kw)

    monkeypatch.setattr(run_mod, "decode_run", decode_run)
    spec = run_mod.EvalSpec(tasks=["passkey"], context=512, samples=2, modes=["dense", "gpu"],
                            flows=["quest"], budgets=["0.25"], max_new_tokens=3, batch=1)
    for warmup, want in ((True, [run_mod.WARMUP_TOKENS, 3] * 2 + [3, 3]), (False, [3] * 4)):
        calls.clear()
        spec.warmup = warmup
        assert len(run_mod.evaluate(model, tok, spec, chat=True)["runs"]) == 4
        assert calls == want


def test_layers_prefilled_by_chunks_equal_sdpa_over_the_whole_prompt(monkeypatch):
    """A tiny Gemma 3 (three sliding layers of window 96, one full layer second, so the layers after
    it read its chunked output), prompts of 700 and 650 tokens in chunks of 64 query rows: every
    layer's keys and values and the first token equal transformers' SDPA prefill of each prompt
    alone (same positions), to float32 rounding."""
    import torch
    import transformers

    from vortex_hybrid.eval import run as run_mod
    torch.manual_seed(MODEL_SEED)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=96,
        max_position_embeddings=4096, layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                     "sliding_attention"])
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    monkeypatch.setattr(run_mod, "PREFILL_CHUNK", 64)
    chunked = []
    real = run_mod.windowed_prefill_attention

    def spy(module, query, *a, **kw):
        chunked.append(query.shape[2] > 64)
        return real(module, query, *a, **kw)
    monkeypatch.setattr(run_mod, "windowed_prefill_attention", spy)
    seqs = [torch.randint(0, 256, (n,)).tolist() for n in (700, 650)]
    (keys, values, _), first, _ = run_mod.prefill_batch(model, seqs)
    assert sum(chunked) == 2 * 4                          # every layer of both prompts
    model.config._attn_implementation = "sdpa"
    for b, x in enumerate(seqs):
        with torch.inference_mode():
            dyn = transformers.DynamicCache(config=model.config)
            logits = model(torch.tensor([x]), position_ids=torch.arange(700 - len(x), 700)[None],
                           past_key_values=dyn).logits
        assert first[b].item() == logits[0, -1].argmax().item()
        for i, layer in enumerate(dyn.layers):
            n = layer.keys.shape[2]
            assert n == (len(x) if i == 1 else 95)
            assert torch.allclose(keys[i][b, :, -n:], layer.keys[0], atol=1e-5)
            assert torch.allclose(values[i][b, :, -n:], layer.values[0], atol=1e-5)


def test_progress_names_each_prompts_prefill_before_the_batchs_runs(model_and_tokenizer):
    """`evaluate(progress=...)`: before each prompt's prefill a call that completes no run
    (`done=False`, naming the prompt), then one completing call per run; the prefill calls of a
    batch all come before its runs."""
    from vortex_hybrid.eval.run import EvalSpec, evaluate
    model, tok = model_and_tokenizer
    calls = []
    spec = EvalSpec(tasks=["passkey"], context=512, samples=3, modes=["dense", "gpu"],
                    flows=["quest"], budgets=["0.25"], max_new_tokens=2, batch=2, warmup=False)
    runs = evaluate(model, tok, spec, chat=True,
                    progress=lambda what, done=True: calls.append((what, done)))["runs"]
    assert sum(done for _, done in calls) == len(runs) == 3 * 2
    prefills = [what for what, done in calls if not done]
    assert prefills == [f"prefill {i}/3 (passkey)" for i in (1, 2, 3)]
    order = [what.split()[0] if not done else "run" for what, done in calls]
    assert order == ["prefill", "prefill"] + ["run"] * 4 + ["prefill"] + ["run"] * 2
