"""Model resolution for the offline evaluation: local folders, built-in names, one-line errors; the
real built-in model end to end where it is already converted (or VH_REAL_MODEL=1 allows fetching)."""

from __future__ import annotations

import os

import pytest

transformers = pytest.importorskip("transformers")

from conftest import USER_CACHE  # noqa: E402
from vortex_hybrid.eval.models import MODELS, resolve_model  # noqa: E402

CONVERTED = (USER_CACHE / "models" / "smollm2-135m" / "config.json").is_file()


def test_a_local_model_folder_is_used_as_is(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, head_dim=8)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    assert resolve_model(str(tmp_path / "m")) == tmp_path / "m"


def test_bad_models_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"model='llama-9000' is neither a folder nor a built-in "
                                         r"model; built-in: \['gemma3-270m', 'smollm2-135m'\]"):
        resolve_model("llama-9000")


def test_a_converted_model_is_found_in_the_cache_without_fetching(tmp_path):
    out = tmp_path / "models" / "smollm2-135m"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    assert resolve_model("smollm2-135m", cache=tmp_path, progress=False) == out


@pytest.mark.skipif(not CONVERTED and os.environ.get("VH_REAL_MODEL") != "1",
                    reason="smollm2-135m not converted here (VH_REAL_MODEL=1 fetches ~93 MB)")
def test_the_built_in_model_loads_and_generates_the_same_with_the_runtime():
    """Reads the model the user converted (their cache); VH_REAL_MODEL=1 without one converts it
    into the session's temporary cache (conftest), never into the user's."""
    import torch
    from vortex_hybrid import HybridConfig
    from vortex_hybrid.integrations.hf import ATTN_IMPLEMENTATION, HybridCache
    path = resolve_model("smollm2-135m", cache=USER_CACHE if CONVERTED else None, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    kw = dict(dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kw)
    ours = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION,
                                                             **kw)
    ids = tok("The pass key is 48213. " + "The grass is green. " * 40 + "The pass key is",
              return_tensors="pt").input_ids
    want = ref.generate(ids, max_new_tokens=6, do_sample=False)
    cache = HybridCache(ours, HybridConfig(placement="hybrid", budget_pages=1000, budget_ratio=None,
                                           kv_dtype="float32", gpu_cache_pages=32, host_memory_gib=0.5))
    got = ours.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
    cache.close()
    assert torch.equal(got, want), (tok.decode(got[0]), tok.decode(want[0]))
    assert MODELS["smollm2-135m"].chat


def test_a_split_model_is_assembled_from_installed_part_packages(tmp_path, monkeypatch):
    """Each chunk from its installed part package (under a data folder, as the registry's part
    packages hold it), joined in order and checked, without a download; a bad part is refused."""
    import hashlib
    import importlib

    from vortex_hybrid.eval import models
    chunks = [b"GGUF" + bytes(range(i, i + 40)) for i in range(3)]
    parts = tuple(f"toy-model-part{i + 1}" for i in range(3))
    for i, (package, chunk) in enumerate(zip(parts, chunks)):
        data = tmp_path / "site" / package.replace("-", "_") / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"toy.gguf.part{i:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setattr(models, "_download", lambda *a: pytest.fail(f"downloaded {a[0]}"))
    spec = models.ModelSpec("toy-model", "toy_model", "toy.gguf", chat=False, context=64,
                            parts=parts, sha256=hashlib.sha256(b"".join(chunks)).hexdigest())

    class Steps:
        def update(self):
            pass
    work = tmp_path / "work"
    work.mkdir()
    path = models._find_gguf(spec, work, Steps())
    assert path.read_bytes() == b"".join(chunks)
    assert all((tmp_path / "site" / p.replace("-", "_")).is_dir() for p in parts)   # left alone
    bad = models.ModelSpec(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="sha256 .* is not the expected"):
        models._find_gguf(bad, work, Steps())
