"""transformers integration: a tiny random Llama through HybridCache gives the logits of the model's
own SDPA path (dense, and sparse placements whose budget covers every page), and `generate` with
a left-padded batch of different lengths equals SDPA's token for token. With a budget well below
the prompt's pages, every sparse placement gives the logits (and `generate` the tokens) of a float64
run of the same model that attends exactly the pages the flow selects (tests/hf_reference.py),
which differ from dense attention's by far more than the tolerance."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import DEVICE, test_seed  # noqa: E402
from hf_reference import sparse_reference  # noqa: E402
from vortex_hybrid import HybridConfig  # noqa: E402
from vortex_hybrid.integrations.hf import ATTN_IMPLEMENTATION, HybridCache  # noqa: E402

P = 4


def tiny_llama(impl: str, seed: int):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = impl
    return model.to(DEVICE)


def config(placement: str, budget: int = 64) -> HybridConfig:
    return HybridConfig(page_size=P, flow="quest", budget_pages=budget, budget_ratio=None,
                        sink_pages=1, recent_pages=2, placement=placement, kv_dtype="float32",
                        gpu_cache_pages=8 if placement in ("offload", "hybrid") else 256)


def cache_for(model, placement, budget=64):
    return HybridCache(model, config(placement, budget), device_pages=256, host_pages=256)


@pytest.mark.parametrize("placement", ["dense", "gpu", "cpu", "offload", "hybrid"])
def test_teacher_forced_logits_equal_sdpa_at_full_budget(placement):
    seed = test_seed()
    ours, ref = tiny_llama(ATTN_IMPLEMENTATION, seed), tiny_llama("sdpa", seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, 30), generator=gen).to(DEVICE)
    with torch.no_grad():
        want = ref(ids).logits
        cache = cache_for(ours, placement)
        got = [ours(ids[:, :21], past_key_values=cache).logits]          # prefill
        for t in range(21, 30):                                          # decode, teacher-forced
            got.append(ours(ids[:, t:t + 1], past_key_values=cache).logits)
    got = torch.cat(got, 1)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"{placement} seed {seed}: relative logit error {err:.2e}"
    assert cache.get_seq_length() == 30
    assert cache.stats()["totals"]["steps"] == 9
    cache.close()


def left_padded_batch(seed: int, length: int, pad: int):
    """Two rows of `length` token ids, the second left-padded by `pad` (id 0, mask 0), on DEVICE,
    and the greedy generate() arguments for 12 new tokens."""
    ids = torch.randint(1, 97, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    ids[1, :pad], mask[1, :pad] = 0, 0
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    return ids, dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)


def test_generate_with_a_padded_batch_equals_sdpa_token_for_token():
    seed = test_seed()
    ours, ref = tiny_llama(ATTN_IMPLEMENTATION, seed), tiny_llama("sdpa", seed)
    ids, kw = left_padded_batch(seed, 26, 9)            # row 1: 17 real tokens
    want = ref.generate(ids, **kw)
    cache = cache_for(ours, "hybrid")
    got = ours.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(got, want), f"seed {seed}:\n{got}\n{want}"
    lens = [cache.runtime.kv.seq_len(r) for r in cache.rids]
    assert lens == [26 + 11, 17 + 11]                   # real tokens only; the last token unwritten
    cache.close()


def teacher_forced(model, ids, prefill: int, cache) -> torch.Tensor:
    """Logits [B, T, V] of a prefill of `prefill` tokens, then one token per step."""
    with torch.no_grad():
        out = [model(ids[:, :prefill], past_key_values=cache).logits]
        for t in range(prefill, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    return torch.cat(out, 1)


def reference_logits(ref64, cfg, ids, prefill: int, dense: bool = False):
    """The float64 reference's teacher-forced logits, and the (layer, row, sel) of its decode."""
    with sparse_reference(ref64, cfg, dense) as log:
        want = teacher_forced(ref64, ids, prefill, transformers.DynamicCache(config=ref64.config))
    return want, log


SPARSE_BUDGET = 6          # pages; the prompt holds 12, the last step 15


def assert_sparse_logits_equal_reference(ours, ref64, placement, ids, prompt, seed):
    """Teacher-forced logits of `ours` at SPARSE_BUDGET after `prompt` tokens equal the float64
    reference's over the flow's selection, and dense attention is far from them (the test can
    tell an ignored selection); returns the cache and the reference's selection log."""
    cache = cache_for(ours, placement, budget=SPARSE_BUDGET)
    got = teacher_forced(ours, ids, prompt, cache).double()
    want, log = reference_logits(ref64, cache.runtime.cfg, ids, prompt)
    dense, _ = reference_logits(ref64, cache.runtime.cfg, ids, prompt, dense=True)
    scale = want.abs().max()
    err = ((got - want).abs().max() / scale).item()
    gap = ((dense - want).abs().max() / scale).item()
    assert err < 1e-4, f"{placement} seed {seed}: relative logit error {err:.2e} (dense: {gap:.2e})"
    assert gap > 0.1, f"seed {seed}: sparse and dense differ by only {gap:.2e}: the test cannot tell"
    return cache, log


@pytest.mark.parametrize("placement", ["gpu", "cpu", "offload", "hybrid"])
def test_sparse_budget_logits_equal_float64_attention_over_the_flows_selection(placement):
    """Prompt of 48 tokens (12 pages), 12 teacher-forced decode steps at a budget of 6 pages (1 sink,
    2 recent, 3 chosen by quest): the logits equal the float64 reference's over the same selection;
    dense attention (what an ignored selection gives) is 1e3 times the tolerance away."""
    seed = test_seed()
    ours, ref64 = tiny_llama(ATTN_IMPLEMENTATION, seed), tiny_llama("sdpa", seed).double()
    ids = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    cache, log = assert_sparse_logits_equal_reference(ours, ref64, placement, ids, 48, seed)
    assert len(log) == 12 * 2 * 2 and all((sel >= 0).sum() == 2 * SPARSE_BUDGET for *_, sel in log)
    assert cache.stats()["totals"]["steps"] == 12
    cache.close()


def test_sparse_generate_with_a_padded_batch_equals_the_float64_reference():
    """Left padding at a sparse budget: each row's pages are cut from its real tokens only, as the
    reference cuts them; greedy tokens equal the reference's."""
    seed = test_seed()
    ours, ref64 = tiny_llama(ATTN_IMPLEMENTATION, seed), tiny_llama("sdpa", seed).double()
    ids, kw = left_padded_batch(seed, 50, 13)           # row 1: 37 real tokens
    cache = cache_for(ours, "hybrid", budget=SPARSE_BUDGET)
    got = ours.generate(ids, past_key_values=cache, **kw)
    with sparse_reference(ref64, cache.runtime.cfg):
        want = ref64.generate(ids, **kw)
    with sparse_reference(ref64, cache.runtime.cfg, dense=True):
        dense = ref64.generate(ids, **kw)
    assert torch.equal(got, want), f"seed {seed}:\n{got}\n{want}\ndense:\n{dense}"
    assert not torch.equal(dense, want), f"seed {seed}: dense gives the same tokens: cannot tell"
    cache.close()


def test_unsupported_models_and_misuse_are_refused():
    seed = test_seed()
    model = tiny_llama(ATTN_IMPLEMENTATION, seed)
    ids = torch.randint(0, 97, (1, 8)).to(DEVICE)
    with pytest.raises(ValueError, match="needs a HybridCache"):
        model(ids)
    cache = cache_for(model, "gpu")
    model(ids, past_key_values=cache)
    with pytest.raises(ValueError, match="second prefill"):
        model(ids, past_key_values=cache)
    cache.close()
    mistral = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, sliding_window=32)
    with pytest.raises(ValueError, match="every layer slides over a window of 32 tokens"):
        HybridCache(transformers.MistralForCausalLM(mistral), config("gpu"))


def test_admitting_a_shared_prefill_decodes_like_the_caches_own_prefill():
    """One SDPA prefill (DynamicCache) admitted into a HybridCache continues exactly as a prefill
    through the cache itself: the evaluation shares one prefill among modes this way."""
    seed = test_seed()
    ours = tiny_llama(ATTN_IMPLEMENTATION, seed)
    ids = torch.randint(0, 97, (1, 37), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with torch.no_grad():
        ours.config._attn_implementation = "sdpa"
        dyn = transformers.DynamicCache(config=ours.config)
        first = ours(ids, past_key_values=dyn).logits[:, -1:].argmax(-1)
        ours.config._attn_implementation = ATTN_IMPLEMENTATION
        shared = cache_for(ours, "hybrid", budget=6)
        shared.admit([layer.keys for layer in dyn.layers], [layer.values for layer in dyn.layers])
        own = cache_for(ours, "hybrid", budget=6)
        ours(ids, past_key_values=own)
        a = b = first
        for _ in range(6):
            la = ours(a, past_key_values=shared).logits[:, -1]
            lb = ours(b, past_key_values=own).logits[:, -1]
            assert torch.allclose(la, lb, rtol=1e-5, atol=1e-5), f"seed {seed}"
            a = b = la.argmax(-1, keepdim=True)
    assert shared.get_seq_length() == own.get_seq_length() == 43
    shared.close()
    own.close()


def tiny_gemma3(impl: str, seed: int):
    """Gemma-3 text layers: sliding (window 8) and full attention alternating, 1 KV head."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    model.config._attn_implementation = impl
    return model.to(DEVICE)


@pytest.mark.parametrize("placement", ["dense", "gpu", "hybrid"])
def test_gemma3_sliding_layers_stay_dense_and_full_layers_go_hybrid(placement):
    """Sliding-window layers attend their window densely, the full-attention layers through the
    runtime: at full budget, teacher-forced logits and generate equal SDPA's."""
    seed = test_seed()
    ours, ref = tiny_gemma3(ATTN_IMPLEMENTATION, seed), tiny_gemma3("sdpa", seed)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with torch.no_grad():
        want = ref(ids).logits
        cache = cache_for(ours, placement)
        assert cache.runtime.num_layers == 2 and cache.runtime_layer == {1: 0, 3: 1}
        got = [ours(ids[:, :29], past_key_values=cache).logits]
        for t in range(29, 40):
            got.append(ours(ids[:, t:t + 1], past_key_values=cache).logits)
    err = ((torch.cat(got, 1) - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"{placement} seed {seed}: relative logit error {err:.2e}"
    assert cache.stats()["totals"]["steps"] == 11
    cache.close()
    cache = cache_for(ours, placement)
    out = ours.generate(ids, past_key_values=cache, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=10, do_sample=False)), f"seed {seed}"
    cache.close()


@pytest.mark.parametrize("placement", ["gpu", "hybrid"])
def test_gemma3_sparse_budget_equals_float64_reference_with_dense_sliding_layers(placement):
    """Gemma-3 at a budget of 6 pages of its 15-18 (full layers) while the sliding layers attend their
    window: teacher-forced logits equal the float64 reference's over the flow's selection."""
    seed = test_seed()
    ours, ref64 = tiny_gemma3(ATTN_IMPLEMENTATION, seed), tiny_gemma3("sdpa", seed).double()
    ids = torch.randint(0, 97, (1, 72), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    cache, log = assert_sparse_logits_equal_reference(ours, ref64, placement, ids, 60, seed)
    assert {layer for layer, *_ in log} == {1, 3}       # the full-attention layers only
    cache.close()


def test_close_after_a_failed_decode_step_frees_the_requests():
    """A decode step that fails between plan() and its last layer leaves the step open; close()
    cancels it before freeing the requests, so the caller sees the original failure and no
    refusal from close() (seed 31)."""
    model = tiny_llama(ATTN_IMPLEMENTATION, 31)
    cache = cache_for(model, "gpu")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(31)).to(DEVICE)
    with torch.no_grad():
        model(ids, past_key_values=cache)                               # prefill
        real = cache.runtime.run

        def fail_at_layer_1(layer, *a, **kw):
            if layer == 1:
                raise RuntimeError("boom in layer 1")
            return real(layer, *a, **kw)
        cache.runtime.run = fail_at_layer_1
        with pytest.raises(RuntimeError, match="boom in layer 1"):
            model(ids[:, :1], past_key_values=cache)
    freed = []
    real_remove = cache.runtime.remove_request
    cache.runtime.remove_request = lambda rid: (real_remove(rid), freed.append(rid))
    rids = list(cache.rids)
    cache.close()                                       # raised "request 0 is in the current step"
    assert freed == rids and len(rids) == 2 and cache.rids == []
