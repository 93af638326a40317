"""The test suite stays out of the user's home: conftest points VORTEX_HYBRID_CACHE at a temporary
folder of this session, so a runtime that measures this machine's costs writes them there, never
to ~/.cache/vortex_hybrid (nor to a cache the user named)."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import TEST_CACHE, USER_CACHE
from vortex_hybrid import HybridAttention, HybridConfig
from vortex_hybrid.eval.models import cache_root
from vortex_hybrid.scheduler import cost_model


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its size and modification time (empty when absent)."""
    if not folder.is_dir():
        return {}
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_the_caches_resolve_to_the_sessions_temporary_folder():
    home = Path.home() / ".cache" / "vortex_hybrid"
    assert TEST_CACHE.is_dir() and TEST_CACHE != USER_CACHE
    assert os.environ[cost_model.CACHE_ENV] == str(TEST_CACHE)
    for path in (cost_model.cache_path(), cache_root()):
        assert path.resolve().is_relative_to(TEST_CACHE.resolve()), path
        assert not path.resolve().is_relative_to(home.resolve()), path
        assert not path.resolve().is_relative_to(USER_CACHE.resolve()), path


def test_a_hybrid_runtime_measuring_its_costs_writes_them_under_the_temporary_folder():
    """`hybrid` without `costs` measures the machine (cost_model.load_or_measure) and caches it."""
    user_before = snapshot(USER_CACHE)
    cfg = HybridConfig(page_size=4, flow="quest", budget_pages=4, budget_ratio=None, sink_pages=1,
                       recent_pages=2, placement="hybrid", gpu_cache_pages=4, kv_dtype="float32")
    attn = HybridAttention(cfg, 1, 2, 1, 8, device_pages=16, host_pages=16)
    try:
        assert cost_model.cache_path().is_file()
        assert cost_model.cache_path().resolve().is_relative_to(TEST_CACHE.resolve())
    finally:
        attn.close()
    assert snapshot(USER_CACHE) == user_before, "the suite wrote into the user's cache"
