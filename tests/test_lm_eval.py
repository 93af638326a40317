"""lm-evaluation-harness: the registered model `vortex_hybrid` runs a local generation task written
by `eval.lm_eval_task` on a tiny random Llama, decoding through HybridAttention; offline."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from tiny_models import tiny_llama_folder, tiny_tokenizer  # noqa: E402
from vortex_hybrid.eval.lm_eval_task import write_tasks  # noqa: E402


def test_a_local_task_runs_with_hybrid_decoding(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from vortex_hybrid.integrations import lm_eval as vh_lm_eval
    model_dir = tiny_llama_folder(tmp_path / "llama")
    names = write_tasks(tmp_path / "tasks", tiny_tokenizer(), ["passkey"], 384, 2, seed=3,
                        max_new=6)
    rows = [json.loads(x) for x in (tmp_path / "tasks" / "vh_passkey.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["answer"] in r["prompt"] for r in rows)
    lm = vh_lm_eval.VortexHybridLM(pretrained=str(model_dir), placement="hybrid", budget=0.1,
                                   device="cpu", batch_size=2)
    out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(
        include_path=str(tmp_path / "tasks")), limit=2)
    metrics = out["results"]["vh_passkey"]
    assert 0.0 <= metrics["exact_match,first_number"] <= 1.0
    assert lm.generated_steps >= 1               # generation decoded through the runtime


def test_bad_options_and_tasks_are_refused(tmp_path):
    from vortex_hybrid.integrations import lm_eval as vh_lm_eval
    with pytest.raises(ValueError, match="placement='moon'"):
        vh_lm_eval.VortexHybridLM(pretrained=str(tmp_path), placement="moon")
    with pytest.raises(ValueError, match=r"tasks \['cwe'\]"):
        write_tasks(tmp_path, tiny_tokenizer(), ["cwe"], 512, 1, 0)
