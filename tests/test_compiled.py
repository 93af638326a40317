"""`vortex_hybrid.compiled`: a function whose compilation fails runs eagerly (a warning names it),
with the same results; an error the function raises eagerly too still reaches the caller; a runtime
with `compile_cache_step` whose compiler fails still returns the reference outputs."""

from __future__ import annotations

import logging

import pytest
import torch

from vortex_hybrid import compiled as compiled_mod


def _broken_compile(fn, **kw):
    def fails(*a, **k):
        raise RuntimeError("backend compiler failed\nsecond line")
    return fails


def double(x):
    if x.numel() == 0:
        raise ValueError("empty input")
    return 2 * x


def test_a_failed_compile_falls_back_to_the_function_once(monkeypatch, caplog):
    monkeypatch.setattr(compiled_mod.torch, "compile", _broken_compile)
    fn = compiled_mod.compiled(double)
    caplog.set_level(logging.WARNING, logger="vortex_hybrid")
    assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))
    assert torch.equal(fn(torch.ones(2)), torch.full((2,), 2.0))
    warned = [r.getMessage() for r in caplog.records if "torch.compile of double" in r.getMessage()]
    assert len(warned) == 1 and "RuntimeError: backend compiler failed" in warned[0], warned
    with pytest.raises(ValueError, match="empty input"):     # the function's own error
        fn(torch.ones(0))


def test_a_runtime_whose_compiler_fails_still_returns_the_reference(monkeypatch, caplog):
    from test_hybrid_attention import Shadow, make
    monkeypatch.setattr(compiled_mod.torch, "compile", _broken_compile)
    caplog.set_level(logging.WARNING, logger="vortex_hybrid")
    attn = make("hybrid", slots=3, budget=4, compile_cache_step=True, cached_steps=False)
    shadow = Shadow(attn, 43)
    rids = [shadow.add(37), shadow.add(26)]
    for _ in range(3):
        assert shadow.step(rids) < 1e-5
    assert attn.stats()["totals"]["fetched_pages"] > 0
    names = {r.getMessage().split("torch.compile of ")[1].split(" ")[0] for r in caplog.records
             if "torch.compile of" in r.getMessage()}
    assert names == {"_layer_step", "fetch_wish", "fetched_table", "partition"}, names
    attn.close()
