"""The README's Python examples run as written (the API example matches dense attention over the
same pages; the calibration example runs its profile command on a tiny model); the README's two
commands are where .ci/run looks for them."""

import re
import shlex
from pathlib import Path

import pytest
import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_api_example_runs_and_is_correct():
    code = re.search(r"## The Python API in ten lines\n```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    kv, rid, q = scope["kv"], scope["rid"], scope["q"]
    k, v = kv.read(rid, 0)                      # every token, from device or host copies
    keep = torch.cat([torch.arange(p * 16, min(p * 16 + 16, k.shape[0])) for p in (150, 200, 249)])
    scores = torch.einsum("hgd,thd->hgt", q[0].double().cpu().view(8, 4, 128), k[keep].double()) / 128 ** 0.5
    expect = torch.einsum("hgt,thd->hgd", scores.softmax(-1), v[keep].double()).reshape(32, 128)
    torch.testing.assert_close(scope["o"][0].double().cpu(), expect, rtol=1e-4, atol=1e-5)


def test_readme_runtime_example_runs():
    code = re.search(r"## The runtime: one decode step on both devices\n```python\n(.*?)```", README,
                     re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    attn, o = scope["attn"], scope["o"]
    assert o.shape == (1, 8, 64) and bool(torch.isfinite(o).all())
    totals = attn.stats()["totals"]
    assert totals["steps"] == 4 and totals["cpu_pages"] + totals["fetched_pages"] > 0
    assert attn.kv.request_ids == []                    # removed at the end of the example


def test_readme_opens_with_the_two_commands():
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        block = README.split(marker, 1)[1]
        assert block.lstrip().startswith("```bash\npython3 -m venv .venv && ")


def test_readme_transformers_example_runs_and_decodes_sparsely():
    """The README's transformers example runs as written and decodes sparsely: each step attends
    fewer page-heads than the prompt has, and the tokens are those of a float64 run of the same
    model attending exactly the flow's selection (tests/hf_reference.py)."""
    from hf_reference import sparse_reference
    code = re.search(r"## In a transformers model\n```python\n(.*?)```", README, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    out, cache, model, ids = scope["out"], scope["cache"], scope["model"], scope["ids"]
    assert out.shape == (1, 1508)
    last = cache.stats()["last_step"]
    pages = -(-1508 // 16)
    assert 0 < last["gpu_pages"] + last["cpu_pages"] < 2 * 2 * pages      # sparse: not every page
    ref64 = type(model)(model.config).eval().double()
    ref64.load_state_dict(model.state_dict())
    with sparse_reference(ref64, cache.runtime.cfg):
        want = ref64.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, want), (out[0, -8:].tolist(), want[0, -8:].tolist())


def test_readme_calibration_example_runs(tmp_path, monkeypatch):
    """The README's per-head budgets example as written: its profile command (on a tiny model in
    place of smollm2-135m, at a short context, few prompts) writes calib.json, its config line
    loads it, and a runtime built from it for that model decodes with per-head budgets."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM
    from tiny_models import tiny_llama_folder
    from vortex_hybrid.integrations.hf import ATTN_IMPLEMENTATION, CACHE_ARGUMENT, HybridCache
    from vortex_hybrid.profile.__main__ import main as profile
    from vortex_hybrid.scheduler.cost_model import DEFAULTS
    section = README.split("## Per-head budgets\n", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)\n", section).group(1).split("#")[0]
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "vortex_hybrid.profile"]
    opts = dict(zip(words[3::2], words[4::2]))
    assert opts["--model"] == "smollm2-135m" and opts["--out"] == "calib.json"
    model_dir = tiny_llama_folder(tmp_path / "llama")
    opts.update({"--model": str(model_dir), "--context": "512"})
    monkeypatch.chdir(tmp_path)                    # the example's relative calib.json lands here
    assert profile([x for kv in opts.items() for x in kv] + [
        "--samples", "2", "--heldout", "0", "--no-bandwidth", "--device", "cpu"]) == 0
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = AutoModelForCausalLM.from_pretrained(model_dir,
                                                 attn_implementation=ATTN_IMPLEMENTATION).eval()
    cache = HybridCache(model, scope["cfg"], costs=DEFAULTS, device_pages=300, host_pages=256)
    assert cache.runtime.head_budgets is not None             # the file's per-head budgets
    ids = torch.randint(0, model.config.vocab_size, (1, 200))
    out = model.generate(ids, **{CACHE_ARGUMENT: cache}, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 203) and cache.stats()["totals"]["steps"] == 2
    cache.close()
