"""benchmarks/sglang_e2e.py runs end to end (here on the CPU, at tiny sizes: SGLang's triton backend
under the Triton interpreter): its JSON holds every run, and at full budget `vortex_hybrid`'s greedy
output equals SGLang's `triton` backend's, request for request (and `--check` says so)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_and_full_budget_agrees_with_triton(tmp_path):
    args = ["--out", str(tmp_path), "--runs", "triton,hybrid@full", "--batch", "2",
            "--context", "96", "--new", "3", "--layers", "2", "--chunk", "64", "--check"]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sglang_e2e.py"), *args],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "sglang_e2e.json").read_text())
    runs = {r["run"]: r for r in result["runs"]}
    assert set(runs) == {"triton", "hybrid@full"}, [r.get("error") for r in result["runs"]]
    assert runs["hybrid@full"]["same_as_triton"] == 2
    assert runs["hybrid@full"]["output_ids"] == runs["triton"]["output_ids"]
    assert "TPOT vs triton" in out.stdout.splitlines()[-5]
    assert out.stdout.splitlines()[-1].startswith("sglang_e2e --check: every run finished")
