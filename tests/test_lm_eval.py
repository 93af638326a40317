"""lm-evaluation-harness: the registered model `vortex_hybrid` runs a local generation task written
by `eval.lm_eval_task` on a tiny random Llama, decoding through HybridAttention; offline. Its
per-sample generations at a sparse budget equal, through the same harness (prompts, batching, left
padding, stop strings), those of a float64 run of the model attending exactly the flow's selection
(tests/hf_reference.py), and differ from transformers' own dense SDPA generations."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from hf_reference import sparse_reference  # noqa: E402
from tiny_models import tiny_llama_folder, tiny_tokenizer  # noqa: E402
from vortex_hybrid import HybridConfig  # noqa: E402
from vortex_hybrid.eval.lm_eval_task import write_tasks  # noqa: E402


def evaluate(lm, tasks_dir, names) -> tuple[dict, list]:
    """(aggregated metrics, per-sample logs sorted by doc id) of vh_passkey for `lm`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks_dir)),
                          limit=2, log_samples=True)
    return out["results"]["vh_passkey"], sorted(out["samples"]["vh_passkey"],
                                                key=lambda s: s["doc_id"])


def test_a_local_task_decodes_like_the_float64_reference_over_the_same_selection(tmp_path):
    from lm_eval.models.huggingface import HFLM
    from vortex_hybrid.integrations import lm_eval as vh_lm_eval

    class Reference64(HFLM):
        """lm-eval's own HF model in float64, generating with the reference attention."""

        def __init__(self, cfg: HybridConfig, **kw):
            super().__init__(dtype="float64", attn_implementation="sdpa", **kw)
            self.cfg = cfg

        def _model_generate(self, context, max_length, stop, **kw):
            with sparse_reference(self.model, self.cfg):
                return super()._model_generate(context, max_length, stop, **kw)

    model_dir = tiny_llama_folder(tmp_path / "llama")
    names = write_tasks(tmp_path / "tasks", tiny_tokenizer(), ["passkey"], 384, 2, seed=3,
                        max_new=6)
    rows = [json.loads(x) for x in (tmp_path / "tasks" / "vh_passkey.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["answer"] in r["prompt"] for r in rows)
    common = dict(pretrained=str(model_dir), device="cpu", batch_size=2)
    lm = vh_lm_eval.VortexHybridLM(placement="hybrid", budget=0.25, **common)    # 6 of 24 pages
    metrics, ours = evaluate(lm, tmp_path / "tasks", names)
    assert lm.generated_steps >= 1               # generation decoded through the runtime
    _, want = evaluate(Reference64(HybridConfig(**lm.vh), **common), tmp_path / "tasks", names)
    _, dense = evaluate(HFLM(attn_implementation="sdpa", **common), tmp_path / "tasks", names)
    texts = [s["resps"][0][0] for s in ours]
    assert texts == [s["resps"][0][0] for s in want], (texts, [s["resps"] for s in want])
    assert all(len(t) > 0 for t in texts)
    assert texts != [s["resps"][0][0] for s in dense], "dense gives the same text: cannot tell"
    per_sample = [float(s["filtered_resps"][0] == s["target"]) for s in ours]
    assert metrics["exact_match,first_number"] == sum(per_sample) / len(per_sample)


def test_bad_options_and_tasks_are_refused(tmp_path):
    from vortex_hybrid.integrations import lm_eval as vh_lm_eval
    with pytest.raises(ValueError, match="placement='moon'"):
        vh_lm_eval.VortexHybridLM(pretrained=str(tmp_path), placement="moon")
    with pytest.raises(ValueError, match=r"tasks \['cwe'\]"):
        write_tasks(tmp_path, tiny_tokenizer(), ["cwe"], 512, 1, 0)


PROBE_YAML = """task: vh_tokenizer_probe
dataset_path: ""
dataset_name: ""
output_type: generate_until
test_split: test
custom_dataset: !function probe_utils.make
doc_to_text: "{{input}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""
PROBE_UTILS = '''
import os
import datasets
from transformers import AutoTokenizer


def make(**kwargs):
    """Like RULER's tasks: size the data with the tokenizer named by the model's `pretrained`."""
    tok = AutoTokenizer.from_pretrained(kwargs["pretrained"])
    with open(os.environ["VH_PROBE_OUT"], "w") as fh:
        fh.write(kwargs["pretrained"])
    text = "The pass key is 4711. Remember it. " * 4 + "The pass key is"
    return {"test": datasets.Dataset.from_list([{"input": text, "target": " 4711",
                                                  "tokens": len(tok(text).input_ids)}])}
'''


@pytest.mark.parametrize("argv, want", [
    (["run", "--model_args", "pretrained=NAME,placement=gpu", "--tasks", "t"],
     ["run", "--model_args", "pretrained=DIR,placement=gpu", "--tasks", "t"]),
    (["run", "-a", "placement=gpu", "pretrained=NAME", "budget=512t", "--limit", "1"],
     ["run", "-a", "placement=gpu", "pretrained=DIR", "budget=512t", "--limit", "1"]),
    (["run", "--model_args=pretrained=NAME", "--tasks", "pretrained=NAME"],
     ["run", "--model_args=pretrained=DIR", "--tasks", "pretrained=NAME"]),
    (["run", "--model_args", "pretrained=./NAME-folder,tokenizer=NAME"],       # folders, other keys
     ["run", "--model_args", "pretrained=./NAME-folder,tokenizer=NAME"]),
    (["run", "--model_args", "pretrained=not-a-built-in"],
     ["run", "--model_args", "pretrained=not-a-built-in"]),
])
def test_built_in_model_names_in_model_args_become_their_folders(monkeypatch, tmp_path, argv, want):
    from vortex_hybrid.eval.models import MODELS
    from vortex_hybrid.integrations import lm_eval as vh_lm_eval
    name, folder = next(iter(MODELS)), str(tmp_path / "converted")
    monkeypatch.setattr(vh_lm_eval, "resolve_model", lambda m: folder if m == name else m)
    sub = [w.replace("NAME", name) for w in argv]
    assert vh_lm_eval.resolve_builtin_names(sub) == [
        w.replace("DIR", folder).replace("NAME", name) for w in want]


def test_a_task_that_loads_its_tokenizer_from_pretrained_runs_with_a_built_in_name(
        tmp_path, monkeypatch):
    """lm-eval hands `--model_args` to the tasks as metadata; a task that loads the tokenizer from
    `pretrained` (as RULER's do) runs offline with a built-in name through our command line (the
    name became the converted folder), and fails through lm-eval's own (the name reaches the hub)."""
    from lm_eval.__main__ import cli_evaluate
    from vortex_hybrid.eval.models import MODELS
    from vortex_hybrid.integrations import lm_eval as vh_lm_eval
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # no network retries
    monkeypatch.setenv("VH_PROBE_OUT", str(tmp_path / "seen"))
    model_dir = tiny_llama_folder(tmp_path / "llama")
    real = vh_lm_eval.resolve_model
    monkeypatch.setitem(MODELS, "tiny-built-in", MODELS[next(iter(MODELS))])
    monkeypatch.setattr(vh_lm_eval, "resolve_model",
                        lambda m: model_dir if m == "tiny-built-in" else real(m))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "probe.yaml").write_text(PROBE_YAML)
    (tmp_path / "tasks" / "probe_utils.py").write_text(PROBE_UTILS)
    argv = ["run", "--model", "vortex_hybrid", "--model_args",
            "pretrained=tiny-built-in,placement=gpu,budget=0.5", "--tasks", "vh_tokenizer_probe",
            "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--limit", "1"]
    vh_lm_eval.main(argv)
    assert (tmp_path / "seen").read_text() == str(model_dir)
    (tmp_path / "seen").unlink()
    monkeypatch.setattr("sys.argv", ["lm_eval", *argv])
    with pytest.raises(OSError, match="huggingface.co"):        # the name went to the hub
        cli_evaluate()
    assert not (tmp_path / "seen").exists()
