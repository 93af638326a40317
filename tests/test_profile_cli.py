"""`python -m vortex_hybrid.profile` end to end on a tiny random model (offline): the calibration it
writes loads, validates and drives the runtime (through the eval CLI's --calibration); bad inputs
exit 2 with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from tiny_models import tiny_llama_folder  # noqa: E402
from vortex_hybrid import HybridConfig  # noqa: E402
from vortex_hybrid.eval.__main__ import main as eval_main  # noqa: E402
from vortex_hybrid.predictors import Calibration  # noqa: E402
from vortex_hybrid.profile.__main__ import main  # noqa: E402
from vortex_hybrid.scheduler import cost_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "llama")


def args(model_dir, out, **over):
    opts = {"--model": str(model_dir), "--context": "512", "--samples": "3", "--heldout": "2",
            "--out": str(out), "--device": "cpu", "--error-target": "0.2"}
    opts.update(over)
    return [x for kv in opts.items() for x in kv if x is not None]


@pytest.fixture(scope="module")
def calibration(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "calib.json"
    assert main(args(model_dir, out) + ["--no-bandwidth"]) == 0
    return out


def test_profile_writes_a_valid_calibration_and_its_pictures(calibration):
    cal = Calibration.load(calibration)
    assert (cal.num_layers, cal.num_kv_heads) == (2, 2)            # the tiny Llama's shape
    assert cal.flow == "centroid" and cal.page_size == 16
    assert np.all((cal.budgets > 0) & (cal.budgets <= 1))
    s = cal.extra["summary"]
    assert s["calibration_prompts"] == 3 and s["heldout_prompts"] == 2
    # the chosen budgets' mean error, recomputed from the stored curves, is the reported one
    E = np.asarray(cal.extra["error_curves"])                       # [L, H, R]
    ladder = cal.extra["ladder"]
    idx = np.searchsorted(ladder, cal.budgets)
    assert np.allclose(np.asarray(ladder)[idx], cal.budgets)
    chosen = np.take_along_axis(E, idx[:, :, None], 2).mean()
    assert chosen == pytest.approx(s["per_head"]["mean_error"])
    assert s["per_head"]["met"] == (chosen <= 0.2 + 1e-12)
    assert 0 < s["heldout"]["pages_ratio"] and s["predictor"]["fitted"]
    machine = cal.extra["machine"]
    assert machine["host"]["memory_total_gib"] > 0 and "costs" not in machine
    for png in ("calib_budgets.png", "calib_reuse.png"):
        assert (calibration.parent / png).stat().st_size > 1000


def test_the_calibration_drives_the_runtime_through_the_eval_cli(model_dir, calibration, tmp_path):
    out = tmp_path / "eval"
    assert eval_main(["--model", str(model_dir), "--context", "512", "--samples", "1", "--tasks",
                      "passkey", "--modes", "dense,gpu", "--max-new-tokens", "3", "--out",
                      str(out), "--device", "cpu", "--calibration", str(calibration)]) == 0
    runs = json.loads((out / "eval.json").read_text())["runs"]
    calibrated = [r for r in runs if r["flow"] == "centroid@calib"]
    assert len(calibrated) == 1 and calibrated[0]["decode_tokens"] >= 1
    cal = Calibration.load(calibration)
    assert float(calibrated[0]["budget"]) == pytest.approx(cal.budgets.mean())
    cfg = HybridConfig(flow="centroid", calibration=str(calibration))
    assert cfg.load_calibration().budgets.tolist() == cal.budgets.tolist()


def test_check_summarises_a_good_file(calibration, capsys):
    assert main(["--check", str(calibration)]) == 0
    assert "per-head budgets" in capsys.readouterr().out


def _bad_file(tmp_path, calibration, edit):
    data = json.loads(calibration.read_text())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("kind, message", [
    ("version", "version 2 is not supported"),
    ("corrupt", "not valid JSON"),
    ("negative", "budgets must be ratios in (0, 1]; found -0.5"),
    ("missing", "missing fields ['budgets']"),
])
def test_check_refuses_a_bad_file_with_one_line(calibration, tmp_path, capsys, kind, message):
    if kind == "corrupt":
        path = tmp_path / "bad.json"
        path.write_text(calibration.read_text()[:50])
    else:
        edit = {"version": lambda d: d.update(version=2),
                "negative": lambda d: d["budgets"][0].__setitem__(0, -0.5),
                "missing": lambda d: d.pop("budgets")}[kind]
        path = _bad_file(tmp_path, calibration, edit)
    with pytest.raises(SystemExit) as exc:
        main(["--check", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize("over, message", [
    ({"--model": "llama-9000"}, "--model 'llama-9000': model='llama-9000' is neither a folder"),
    ({"--context": "9000"}, "--context 9000 exceeds the model's 4096 positions"),
    ({"--error-target": "0"}, "--error-target 0.0: a positive number"),
    ({"--tasks": "passkey,trivia"}, "--tasks 'passkey,trivia': unknown ['trivia']"),
    ({"--flow": "qwest"}, "HybridConfig.flow='qwest' is invalid"),
    ({"--probes": "1"}, "--probes 1: must be >= 2"),
])
def test_bad_inputs_exit_2_with_one_line(model_dir, tmp_path, capsys, over, message):
    with pytest.raises(SystemExit) as exc:
        main(args(model_dir, tmp_path / "c.json", **over))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_an_unwritable_output_exits_2_before_any_work(model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(args(model_dir, blocker / "calib.json"))
    assert exc.value.code == 2
    assert "is not writable" in capsys.readouterr().err


def test_eval_refuses_a_calibration_made_with_another_page_size(model_dir, calibration, tmp_path,
                                                                capsys):
    path = _bad_file(tmp_path, calibration, lambda d: d.update(page_size=32))
    with pytest.raises(SystemExit) as exc:
        eval_main(["--model", str(model_dir), "--out", str(tmp_path / "e"), "--calibration",
                   str(path)])
    assert exc.value.code == 2
    assert "page_size=32" in capsys.readouterr().err


def test_a_calibration_for_another_model_name_is_refused_by_eval_and_hybrid_cache(
        model_dir, calibration, tmp_path, capsys):
    """Same shapes, another name: the eval CLI refuses it before loading the model, `HybridCache`
    when it is built; the model it was made for is accepted."""
    import shutil
    from transformers import AutoModelForCausalLM
    from vortex_hybrid.integrations.hf import HybridCache
    cal = Calibration.load(calibration)
    assert cal.model["name"] == model_dir.name == "llama"              # the folder's name
    assert (cal.model["num_q_heads"], cal.model["head_dim"]) == (4, 16)
    other = shutil.copytree(model_dir, tmp_path / "other-llama")
    with pytest.raises(SystemExit) as exc:
        eval_main(["--model", str(other), "--out", str(tmp_path / "e"), "--calibration",
                   str(calibration)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "was made with model='llama', but the evaluation has model='other-llama'; re-run " \
           "python -m vortex_hybrid.profile for this model" in err and "\n" not in err
    cfg = HybridConfig(placement="gpu", flow="centroid", calibration=str(calibration))
    HybridCache(AutoModelForCausalLM.from_pretrained(model_dir), cfg, device_pages=64, host_pages=64).close()
    with pytest.raises(ValueError, match="was made with model='llama', but the HybridCache has "
                                         "model='other-llama'"):
        HybridCache(AutoModelForCausalLM.from_pretrained(other), cfg, device_pages=64, host_pages=64)


def test_the_command_line_measures_the_machine_for_the_runtime(model_dir, tmp_path):
    import os
    import subprocess
    import sys
    env = dict(os.environ, VORTEX_HYBRID_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "c.json"
    run = subprocess.run([sys.executable, "-m", "vortex_hybrid.profile", *args(
        model_dir, out, **{"--samples": "2", "--heldout": "0"})], env=env, capture_output=True,
        text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    machine = Calibration.load(out).extra["machine"]
    costs = machine["costs"]
    measurable = list(cost_model.measurable())          # without CUDA: the CPU figures only
    assert costs["cpu_attn_bw"] > 0 and costs["measured"] == measurable
    assert costs["defaulted"] == [k for k in cost_model.NUMERIC if k not in measurable]
    saved = json.loads((tmp_path / "cache" / "machine_costs.json").read_text())
    assert saved["cpu_attn_bw"] == costs["cpu_attn_bw"]    # the scheduler reads these
    assert saved["measured"] == measurable and machine["costs_saved_to"].endswith("machine_costs.json")
    printed = next(line for line in run.stdout.splitlines() if line.startswith("machine costs"))
    assert f"measured: {measurable[0]} " in printed and \
        ("defaulted: " in printed) == (costs["defaulted"] != [])
    assert "wrote" in run.stdout


@pytest.mark.parametrize("target", [0.6, 0.8])          # 0.8: a head takes token granularity
def test_retarget_chooses_again_from_the_stored_curves(calibration, tmp_path, capsys, target):
    from vortex_hybrid.predictors import select_budgets
    from vortex_hybrid.predictors.head_properties import token_cost
    out = tmp_path / "loose.json"
    assert main(["--retarget", str(calibration), "--error-target", str(target), "--out",
                 str(out)]) == 0
    old, new = Calibration.load(calibration), Calibration.load(out)
    E = np.asarray(old.extra["error_curves"])
    L, H, R = E.shape
    pages = np.asarray(old.extra["pages_curve"])
    # the profile ran with --granularity auto: each head may also take the ladder at token
    # granularity, at token_cost of the pages' bytes (on a GPU the curves make one head pick it)
    options = np.concatenate([E, np.asarray(old.extra["token_error_curves"])], -1)
    cost = np.concatenate([pages, pages * token_cost(old.token_share)])
    want = select_budgets(options.reshape(L * H, 2 * R), cost, target)
    ladder = np.asarray(old.extra["ladder"])
    assert new.budgets.tolist() == ladder[want.index % R].reshape(L, H).tolist()
    assert new.granularity == np.where(want.index // R == 1, "token", "page").reshape(L, H).tolist()
    assert new.error_target == target and new.budgets.mean() <= old.budgets.mean()
    assert new.extra["summary"]["per_head"]["mean_error"] == pytest.approx(want.mean_error)
    with pytest.raises(SystemExit) as exc:
        main(["--retarget", str(tmp_path / "none.json"), "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2


def test_the_eval_runs_one_calibration_per_flow_and_refuses_two_for_one_flow(
        model_dir, calibration, tmp_path, capsys):
    data = json.loads(calibration.read_text())
    data["flow"] = "quest"
    quest = tmp_path / "quest.json"
    quest.write_text(json.dumps(data))
    out = tmp_path / "eval"
    assert eval_main(["--model", str(model_dir), "--context", "512", "--samples", "1", "--tasks",
                      "passkey", "--modes", "gpu", "--flow", "quest,centroid", "--budget", "0.05",
                      "--max-new-tokens", "3", "--out", str(out), "--device", "cpu", "--no-warmup",
                      "--calibration", f"{calibration},{quest}"]) == 0
    runs = json.loads((out / "eval.json").read_text())["runs"]
    assert sorted(r["flow"] for r in runs) == ["centroid", "centroid@calib", "quest", "quest@calib"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        eval_main(["--model", str(model_dir), "--out", str(tmp_path / "e"), "--calibration",
                   f"{quest},{quest}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "are both for flow 'quest'" in err[0]
