"""The eval's decode speed excludes one-time costs: the timed decode of a (mode, flow, budget) never
includes its first call. A stand-in for compilation (the clock jumps by an hour the first time a
runtime of each config plans a decode step) must show in no run's decode time, and every config
must have had its first call (so the jump happened, in an untimed warm-up)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("transformers")

from tiny_models import tiny_llama_loaded  # noqa: E402

MODEL_SEED = 5519370217          # fixed: the module fixture is set up before conftest's per-test seed
COMPILE_S = 3600.0               # the clock's jump at a config's first call: far above any decode


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    return tiny_llama_loaded(tmp_path_factory.mktemp("tiny") / "llama", MODEL_SEED)


def first_call_clock(monkeypatch) -> set:
    """Make each runtime config's first `plan` (its first decode step) cost COMPILE_S on
    `time.perf_counter`; returns the set of configs seen."""
    from vortex_hybrid.runtime.hybrid_attention import HybridAttention
    seen, jump, real_clock, real_plan = set(), [0.0], time.perf_counter, HybridAttention.plan

    def clock() -> float:
        return real_clock() + jump[0]

    def plan(self, rids):
        key = (self.cfg.placement, self.cfg.flow, self.cfg.budget_ratio, self.cfg.budget_tokens)
        if key not in seen:
            seen.add(key)
            jump[0] += COMPILE_S
        return real_plan(self, rids)

    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(HybridAttention, "plan", plan)
    return seen


@pytest.mark.parametrize("batch", [1, 2])
def test_the_timed_decode_of_a_mode_never_includes_its_first_call(model_and_tokenizer,
                                                                   monkeypatch, batch):
    from vortex_hybrid.eval.run import EvalSpec, evaluate
    model, tok = model_and_tokenizer
    seen = first_call_clock(monkeypatch)
    spec = EvalSpec(tasks=["passkey"], context=512, samples=2, modes=["dense", "cpu", "streaming"],
                    flows=["quest"], budgets=["0.25", "96t"], max_new_tokens=4, batch=batch)
    runs = evaluate(model, tok, spec, chat=True)["runs"]
    configs = 1 + 2 + 2                        # dense; cpu and streaming at two budgets each
    assert len(seen) == configs, seen          # every config made its first call ...
    assert len(runs) == 2 * configs            # ... and the warm-ups are not runs
    slow = [(r["mode"], r["budget"], r["sample"], r["decode_s"]) for r in runs
            if r["decode_s"] >= COMPILE_S / batch / 2]
    assert not slow, f"timed decodes that include a first call: {slow}"
    assert all(r["decode_s"] > 0 and r["decode_tokens"] >= 1 for r in runs)
