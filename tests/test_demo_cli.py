"""The demo's command line: bad options give one line naming the value and what is allowed, exit 2;
a good one runs (warm-up before timing, the config's budget, --flow)."""

from __future__ import annotations

import subprocess
import sys

import pytest

BAD = [
    (["--batch", "0"], "--batch=0 must be a positive integer"),
    (["--kv-heads", "0"], "--kv-heads=0 must be a positive integer"),
    (["--context", "-3"], "--context=-3 must be a positive integer"),
    (["--repeats", "0"], "--repeats=0 must be a positive integer"),
    (["--config", "nope.json"], "cannot read 'nope.json'"),
    (["--config", '{"flow": "double_sparsity", "extra": {"chanels": 8}}'],
     "'chanels' (did you mean 'channels'?)"),
    (["--config", '{"flow": "streaming", "extra": {"gqa": "max"}}'], "it takes no options"),
    (["--flow", "qeust"], "did you mean 'quest'?"),
    (["--q-heads", "6", "--kv-heads", "4"], "--q-heads=6 must be a multiple of --kv-heads=4"),
    (["--layers", "0"], "--layers=0 must be a positive integer"),
    (["--cache", "0"], "--cache=0.0 must lie in (0, 1]"),
    (["--placements", "gpu,tpu"], "--placements='gpu,tpu': allowed are dense,gpu,cpu,offload,hybrid"),
]


def demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vortex_hybrid.demo", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,message", BAD)
def test_bad_option_gives_one_line_and_exit_code_2(args, message):
    out = demo(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


def test_small_demo_runs_every_placement_with_the_config_budget_and_a_flow_option():
    out = demo("--batch", "2", "--context", "256", "--q-heads", "4", "--kv-heads", "2",
               "--head-dim", "16", "--repeats", "1", "--flow", "centroid", "--config",
               '{"kv_dtype": "float32"}')
    assert out.returncode == 0, out.stderr
    assert "flow centroid" in out.stdout and "budget 3 of 16 pages" in out.stdout, out.stdout
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.split() and line.split()[0] in ("dense", "gpu", "cpu", "offload", "hybrid")}
    assert sorted(rows) == ["cpu", "dense", "gpu", "hybrid", "offload"], out.stdout
    for name, cols in rows.items():
        assert float(cols[-1]) < 1e-5, (name, cols)          # float32: the reference's pages
    assert int(rows["cpu"][3]) > 0 and int(rows["gpu"][3]) == 0  # host pages on the CPU
