"""benchmarks/sglang_accuracy.py runs end to end (here on the CPU engine, the tiny Llama in place of
a built-in model, the eval's own prompts at a short context): SGLang's torch_native backend is the
peer, `vortex_hybrid` at full budget gives its tokens request for request, each run's accuracy is
scored from its own text, and a run whose engine cannot start fails alone (`--check` names it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_accuracy_benchmark_runs_and_full_budget_gives_the_peers_tokens(tiny_model, tmp_path):
    args = ["--model", str(tiny_model), "--out", str(tmp_path), "--runs", "nowhere@full,hybrid@full,gpu",
            "--context", "700", "--samples", "2", "--tasks", "niah_single", "--max-new-tokens", "3",
            "--check"]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sglang_accuracy.py"), *args],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 1, out.stderr[-3000:]         # --check: the failed run
    result = json.loads((tmp_path / "sglang_accuracy.json").read_text())
    runs = result["runs"]
    assert set(runs) == {"peer", "nowhere@full", "hybrid@full", "gpu"}
    # an engine that cannot start (an unknown placement) fails its run, in its own process, and
    # the runs after it still answer
    assert "placement" in runs["nowhere@full"]["error"], runs["nowhere@full"]
    assert "failed: ['nowhere@full']" in out.stderr
    assert runs["peer"]["backend"] == "torch_native"
    assert runs["hybrid@full"]["output_ids"] == runs["peer"]["output_ids"]
    assert runs["hybrid@full"]["same_as_peer"] == runs["peer"]["n"] == 2
    assert runs["hybrid@full"]["accuracy"] == runs["peer"]["accuracy"]
    assert runs["gpu"]["budget"] == "0.05 (lowbit)"
    assert all(len(ids) == 3 for ids in runs["gpu"]["output_ids"])
    assert "| peer | torch_native |" in (tmp_path / "sglang_accuracy.md").read_text()


def test_bad_options_exit_2_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sglang_accuracy.py"),
                          "--samples", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 2 and "--samples=0 must be a positive integer" in out.stderr
