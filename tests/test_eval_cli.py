"""`python -m vortex_hybrid.eval` end to end on a tiny random model (offline), and its bad inputs:
exit code 2 with one line."""

from __future__ import annotations

import json
import math
import warnings

import pytest

pytest.importorskip("transformers")

from tiny_models import tiny_llama_folder  # noqa: E402
from vortex_hybrid.eval.__main__ import main  # noqa: E402

MODEL_SEED = 67280421310721     # fixed: a module fixture is set up before conftest's per-test seed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    torch.manual_seed(MODEL_SEED)             # module-scoped: set up before the per-test seed
    print(f"model seed {MODEL_SEED}")
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "llama")


def args(model_dir, out, **over):
    opts = {"--model": str(model_dir), "--context": "512", "--samples": "1", "--tasks": "passkey",
            "--modes": "dense,hybrid,streaming", "--max-new-tokens": "4", "--out": str(out),
            "--device": "cpu", "--budget": "0.1"}
    opts.update(over)
    return [x for kv in opts.items() for x in kv]


def test_a_tiny_configuration_runs_end_to_end(model_dir, tmp_path, capsys):
    assert main(args(model_dir, tmp_path / "out", **{"--tasks": "passkey,vt",
                                                       "--flow": "quest,centroid"})) == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert len(result["runs"]) == 2 * 4          # tasks x (dense + hybrid x 2 flows + streaming)
    assert {(r["mode"], r["flow"]) for r in result["runs"]} == {
        ("dense", None), ("hybrid", "quest"), ("hybrid", "centroid"), ("streaming", "streaming")}
    assert (tmp_path / "out" / "eval.png").stat().st_size > 0
    modes = {(s["task"], s["mode"]) for s in result["summary"]}
    assert ("all", "hybrid") in modes and ("vt", "dense") in modes
    for run in result["runs"]:
        assert 0 <= run["score"] <= 1 and run["prompt_tokens"] <= 512
        assert run["decode_tokens"] >= 1 and run["kv_bytes_per_token"] > 0
    dense = [r for r in result["runs"] if r["mode"] == "dense"]
    sparse = [r for r in result["runs"] if r["mode"] == "hybrid"]
    assert sparse[0]["kv_bytes_per_token"] < dense[0]["kv_bytes_per_token"]   # sparse reads less
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("over, message", [
    ({"--modes": "dense,turbo"}, "--modes 'dense,turbo': unknown ['turbo']"),
    ({"--tasks": "passkey,trivia"}, "--tasks 'passkey,trivia': unknown ['trivia']"),
    ({"--model": "llama-9000"}, "--model 'llama-9000': model='llama-9000' is neither a folder"),
    ({"--context": "5000"}, "--context 5000 + --max-new-tokens 4 exceeds the model's 4096"),
    ({"--budget": "0,0.5"}, "--budget '0,0.5': budget '0' is invalid: a fraction of a request's "
                            "pages in (0, 1] (e.g. 0.05) or a token count per KV head with a 't' "
                            "suffix (e.g. 512t)"),
    ({"--budget": "0.05,512"}, "--budget '0.05,512': budget '512' is invalid: a fraction"),
    ({"--budget": "0.05,0t"}, "--budget '0.05,0t': budget '0t' is invalid"),
    ({"--budget": "64 tokens"}, "--budget '64 tokens': budget '64 tokens' is invalid"),
    ({"--budget": ","}, "--budget ',': no budget given: a comma list such as 0.05,512t"),
    ({"--samples": "0"}, "--samples 0: must be >= 1"),
    ({"--flow": "centroid,qwest"}, "--flow 'qwest': HybridConfig.flow='qwest' is invalid"),
])
def test_bad_inputs_exit_2_with_one_line(model_dir, tmp_path, capsys, over, message):
    with pytest.raises(SystemExit) as exc:
        main(args(model_dir, tmp_path / "out", **over))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("text, budgets", [
    ("0.05", ["0.05"]), ("0.05,512t", ["0.05", "512t"]), (" 0.1 , 64t ,", ["0.1", "64t"]),
    ("0.050,0.05,512t,512t", ["0.05", "512t"]), ("1,1t", ["1.0", "1t"]),
])
def test_the_budget_option_reads_fractions_and_token_counts(text, budgets):
    from vortex_hybrid.eval.run import budget_label, parse_budgets
    assert parse_budgets(text) == budgets
    assert [budget_label(b) for b in parse_budgets("0.05,0.025,512t")] == ["5%", "2.5%", "512t"]


def test_fraction_and_token_budgets_run_side_by_side(model_dir, tmp_path, capsys):
    """--budget 0.25,96t: a run per budget; the token budget reads 96 / 16 = 6 pages per KV head
    and layer, the fraction ceil(0.25 * pages); the table shows both, the legend explains it, and
    the run warns of nothing deprecated."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args(model_dir, tmp_path / "out", **{"--budget": "0.25,96t",
                                                           "--modes": "dense,gpu"})) == 0
    future = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
              if issubclass(w.category, FutureWarning) or "deprecated" in str(w.message)]
    assert not future, future                    # e.g. transformers' renamed cache argument
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    gpu = {r["budget"]: r for r in result["runs"] if r["mode"] == "gpu"}
    assert sorted(gpu) == ["0.25", "96t"]
    heads = 2 * 2                                # tiny model: 2 layers x 2 KV heads
    pages = -(-(gpu["96t"]["prompt_tokens"] + 1) // 16)
    assert gpu["96t"]["gpu_page_heads_per_token"] == 6 * heads
    assert gpu["0.25"]["gpu_page_heads_per_token"] == math.ceil(0.25 * pages) * heads
    assert math.ceil(0.25 * pages) != 6                  # the two budgets read different pages
    assert gpu["96t"]["budget_share"] == 96 / 512 and gpu["0.25"]["budget_share"] == 0.25
    out = capsys.readouterr().out
    assert " 25% " in out and " 96t " in out and "legend: budget = " in out
    assert "p-h/tok = page-heads" in out and "untimed warm-up" in out
    assert "the `gpu` side of every mode (GPU kernels, GPU page cache) runs on the CPU" in out


def test_an_unwritable_output_folder_exits_2(model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(args(model_dir, tmp_path / "file" / "out"))
    assert exc.value.code == 2 and "is not writable" in capsys.readouterr().err


def test_batched_decoding_gives_the_unbatched_outputs(model_dir, tmp_path):
    """--batch 2 (left-padded prompts of different lengths, one request per row) decodes what
    --batch 1 decodes, in the dense and a sparse mode; the budget covers every page, so the only
    difference is the batching."""
    common = {"--tasks": "passkey,niah_single", "--samples": "2", "--modes": "dense,gpu",
              "--budget": "1.0", "--max-new-tokens": "6"}
    outs = {}
    for batch in ("1", "2"):
        assert main(args(model_dir, tmp_path / batch, **common, **{"--batch": batch})) == 0
        runs = json.loads((tmp_path / batch / "eval.json").read_text())["runs"]
        outs[batch] = sorted((r["task"], r["sample"], r["mode"], r["output"]) for r in runs)
        assert {r["batch"] for r in runs} == {int(batch)}
    assert len(outs["1"]) == 8 and outs["1"] == outs["2"]


def reference_greedy(ref64, cfg, seqs: list[list[int]], pad: int, max_new: int, eos: set[int],
                     select=None) -> list[list[int]]:
    """Greedy tokens of the float64 model attending, per decode step, exactly the flow's selection
    (or `select`'s, `hf_reference.sparse_reference`) over each row's real tokens
    (tests/hf_reference.py), for the left-padded batch of `seqs` at the eval's positions (RoPE's
    float32 angles depend on them); each row through its first EOS."""
    import torch
    import transformers

    from hf_reference import sparse_reference
    from vortex_hybrid.integrations.hf import CACHE_ARGUMENT
    T = max(map(len, seqs))
    ids = torch.tensor([[pad] * (T - len(x)) + x for x in seqs])
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in seqs])
    with sparse_reference(ref64, cfg, select=select), torch.no_grad():
        cache = transformers.DynamicCache(config=ref64.config)
        x = ref64(ids, attention_mask=mask, **{CACHE_ARGUMENT: cache}).logits[:, -1:].argmax(-1)
        out = [x]
        for _ in range(max_new - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            x = ref64(x, attention_mask=mask, **{CACHE_ARGUMENT: cache}).logits[:, -1:].argmax(-1)
            out.append(x)
    rows = torch.cat(out, 1).tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


@pytest.mark.parametrize("mode", ["gpu", "hybrid"])
def test_sparse_outputs_equal_the_float64_reference_over_the_flows_selection(model_dir, mode):
    """A budget of 25% (8 of about 32 pages; 1 sink, 2 recent): each sample's output equals a
    float64 transformers run of the model attending exactly the flow's selection, with a left-padded
    batch of two samples of different lengths; the dense mode's outputs differ."""
    import torch
    import transformers

    from vortex_hybrid.eval import tasks as task_lib
    from vortex_hybrid.eval.run import EvalSpec, evaluate, mode_config
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    spec = EvalSpec(tasks=["passkey", "niah_single"], context=512, samples=1, modes=["dense", mode],
                    flows=["quest"], budgets=[0.25], max_new_tokens=8, batch=2)
    runs = evaluate(model, tok, spec, chat=True)["runs"]
    suite = task_lib.make_suite(spec.tasks, tok, spec.context, spec.samples, spec.seed, True,
                                haystack=spec.haystack)
    seqs = [task_lib.render(s, tok, True) for s in suite]
    assert len({len(s) for s in seqs}) == 2 and min(map(len, seqs)) > 16 * 24   # padded, > 24 pages
    cfg = mode_config(mode, "quest", 0.25, "float32")
    ref64 = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    want = [tok.decode(row, skip_special_tokens=True)           # pad 0: masked, any id will do
            for row in reference_greedy(ref64, cfg, seqs, 0, 8, {tok.eos_token_id})]
    got = [r["output"] for r in sorted(runs, key=lambda r: r["sample"]) if r["mode"] == mode]
    dense = [r["output"] for r in sorted(runs, key=lambda r: r["sample"]) if r["mode"] == "dense"]
    assert got == want, (got, want, dense)
    assert dense != want, "dense gives the same outputs: the test cannot tell"


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_the_mass_oracle_attends_the_top_pages_of_the_true_mass(model_dir, mode):
    """`--flow mass` at 10% (4 of about 32 pages; 1 sink, 2 recent): each sample's output equals a
    float64 transformers run of the model attending, per decode step and (layer, KV head), the
    pages of the most true attention mass (computed independently, `test_eval_mass_oracle`), with
    a left-padded batch of two samples; the dense mode's outputs differ."""
    import torch
    import transformers

    from test_eval_mass_oracle import true_pages
    from vortex_hybrid.eval import tasks as task_lib
    from vortex_hybrid.eval.run import EvalSpec, evaluate, mode_config
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    spec = EvalSpec(tasks=["passkey", "niah_single"], context=512, samples=1, modes=["dense", mode],
                    flows=["mass"], budgets=["0.1"], max_new_tokens=8, batch=2)
    runs = evaluate(model, tok, spec, chat=True)["runs"]
    assert {r["flow"] for r in runs if r["mode"] == mode} == {"mass"}
    suite = task_lib.make_suite(spec.tasks, tok, spec.context, spec.samples, spec.seed, True,
                                haystack=spec.haystack)
    seqs = [task_lib.render(s, tok, True) for s in suite]
    cfg = mode_config(mode, "mass", "0.1", "float32")

    def select(q, k):
        pages = true_pages(q, k, cfg)
        width = cfg.budget_for(-(-k.shape[0] // cfg.page_size))
        return [row + [-1] * (width - len(row)) for row in pages]

    ref64 = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    want = [tok.decode(row, skip_special_tokens=True)
            for row in reference_greedy(ref64, cfg, seqs, 0, 8, {tok.eos_token_id}, select)]
    got = [r["output"] for r in sorted(runs, key=lambda r: r["sample"]) if r["mode"] == mode]
    dense = [r["output"] for r in sorted(runs, key=lambda r: r["sample"]) if r["mode"] == "dense"]
    assert got == want, (got, want, dense)
    assert dense != want, "dense gives the same outputs: the test cannot tell"
