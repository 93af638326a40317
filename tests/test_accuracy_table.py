"""benchmarks/accuracy_table.py: eval results (one per model and context) into the combined JSON,
the markdown table (a row per context and flow, dense and streaming beside, calibrated rows with
their mean budget and KV bytes) and the plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_table.py"


def load():
    spec = importlib.util.spec_from_file_location("accuracy_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def summary(mode, flow, budget, share, acc, mb):
    return dict(task="all", mode=mode, flow=flow, budget=budget, budget_share=share, n=40,
                accuracy=acc, interval=[0, 1], decode_tokens_per_s=1.0,
                kv_bytes_per_token=mb * 1e6, gpu_page_heads_per_token=1.0,
                cpu_page_heads_per_token=0.0)


def eval_json(path: Path, model: str, context: int, shift: float) -> str:
    rows = [summary("dense", None, None, None, 0.9, 10.0),
            summary("streaming", "streaming", "0.05", 0.05, 0.1, 0.5),
            summary("streaming", "streaming", "512t", 512 / context, 0.2, 0.6)]
    for flow in ("quest", "centroid"):
        rows += [summary("gpu", flow, "0.05", 0.05, 0.5 + shift, 0.5),
                 summary("gpu", flow, "512t", 512 / context, 0.6 + shift, 0.6)]
    rows.append(summary("gpu", "centroid@calib", "0.041", 0.041, 0.55 + shift, 0.41))
    rows.append(dict(rows[-1], task="niah_single", accuracy=0.0))       # per task: not in the table
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(
        model=model, context=context, device="cpu", seconds=1.0, chat=False,
        spec=dict(tasks=["niah_single", "niah_multikey"], budgets=["0.05", "512t"]),
        summary=rows, runs=[dict(task="niah_single", sample=0, mode="dense", flow=None,
                                 budget=None, score=1.0, output=" 1.", prefill_s=0.1)])))
    return str(path)


def test_results_become_one_json_a_table_per_model_and_a_plot(tmp_path):
    mod = load()
    files = [eval_json(tmp_path / "a" / "eval.json", "gemma3-270m", 8192, 0.0),
             eval_json(tmp_path / "b" / "eval.json", "gemma3-270m", 16384, 0.1),
             eval_json(tmp_path / "c" / "eval.json", "smollm2-135m", 4096, 0.2)]
    out = tmp_path / "out"
    out.mkdir()
    assert mod.main(files + ["--json", str(out / "acc.json"), "--md", str(out / "acc.md"),
                             "--png", str(out / "acc.png")]) == 0
    combined = json.loads((out / "acc.json").read_text())["results"]
    assert [(r["model"], r["context"]) for r in combined] == [
        ("gemma3-270m", 8192), ("gemma3-270m", 16384), ("smollm2-135m", 4096)]
    assert "prefill_s" not in combined[0]["runs"][0]                  # timing fields dropped
    md = (out / "acc.md").read_text()
    assert md.count("### ") == 2 and "| context | flow | dense | 5% | 512t |" in md
    assert "| 8K | quest | 0.90 | 0.50 | 0.60 | - |" in md
    assert "|  | centroid |  | 0.50 | 0.60 | 0.55 (4.1%; 0.41 vs 0.50) |" in md
    assert "|  | streaming |  | 0.10 | 0.20 | - |" in md
    assert "| 16K | quest | 0.90 | 0.60 | 0.70 | - |" in md
    assert (out / "acc.png").stat().st_size > 1000
    # the combined file reads back as input, a later result of a (model, context) replacing it
    again = eval_json(tmp_path / "d" / "eval.json", "smollm2-135m", 4096, 0.3)
    assert mod.main([str(out / "acc.json"), again, "--md", str(out / "again.md")]) == 0
    assert "| 4K | quest | 0.90 | 0.80 | 0.90 | - |" in (out / "again.md").read_text()
