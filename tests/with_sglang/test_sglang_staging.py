"""The prefill staging area (real SGLang 0.5.17's pool class on the CPU): each layer's buffer is
its own slots then a prefix region that overlaps the later layers' own slots, so the area holds
the new tokens of every layer and the earlier chunks of one layer. Replayed as an extend batch
runs: per layer, the earlier tokens restaged, the new tokens written, the layer reads its tokens;
after the last layer every layer's new tokens must still be there (what the backend syncs into
the runtime)."""

from __future__ import annotations

import types

import pytest
import torch

from vortex_hybrid.integrations.sglang import sizing

P, L, H, D = 4, 5, 2, 8


def staging(own: int, prefix: int, rows: int = 4) -> sizing.Staging:
    pool = types.SimpleNamespace(page_size=P, dtype=torch.float32, head_num=H, head_dim=D,
                                 layer_num=L, device="cpu")
    runner = types.SimpleNamespace(
        token_to_kv_pool=pool,
        req_to_token_pool=types.SimpleNamespace(req_to_token=torch.zeros(rows, 64, dtype=torch.int32),
                                                size=rows))
    return sizing.Staging(runner, own, prefix)


def test_the_layers_share_one_prefix_region_and_the_area_counts_it_once():
    s = staging(own=6 * P, prefix=5 * P)
    k = s.pool.k_buffer
    assert all(t.shape == (11 * P, H, D) for t in k)
    base = k[0].untyped_storage().data_ptr()
    row = H * D * 4
    assert [t.data_ptr() - base for t in k] == [layer * 6 * P * row for layer in range(L)]
    assert s.bytes == 2 * (L * 6 * P + 5 * P) * row
    assert s.pool.get_kv_size_bytes() == ((L * 6 * P + 5 * P) * row,) * 2   # SGLang's log line


@pytest.mark.parametrize("tight", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_extend_batch_reads_every_layer_exactly_and_keeps_every_layers_new_tokens(seed, tight):
    """Rows with earlier chunks (starting mid-page and on a page boundary) and a fresh row: each
    layer attends exactly its tokens [0, end), and after the last layer each layer's new tokens
    are intact although later layers restaged their earlier chunks over other layers' slots.
    tight: the area as `staging_slots` sizes it, or exactly as large as the batch needs (no slack
    between one layer's own slots and the next layer's)."""
    g = torch.Generator().manual_seed(seed)
    rows, starts, ends = [0, 2, 3], [10, 0, 8], [17, 5, 12]
    sa = types.SimpleNamespace(max_prefill_tokens=sum(e - s for s, e in zip(starts, ends)),
                               chunked_prefill_size=0)
    own, prefix = sizing.staging_slots(sa, 24, len(rows), P)
    if tight:
        own = P + sum(-(-(e - st // P * P) // P) for st, e in zip(starts, ends)) * P
        prefix = sum(st // P * P for st in starts)
    s = staging(own, prefix)
    kv = {r: torch.randn(2, L, e, H, D, generator=g) for r, e in zip(rows, ends)}  # [K/V, L, T]
    new = s.place(rows, starts, ends)
    assert new.numel() == sum(e - st for st, e in zip(starts, ends))
    for r, st, e in zip(rows, starts, ends):
        slots = s.slots(r, 0, e)
        assert slots.unique().numel() == e                        # no slot twice in a row
        assert bool((slots[:st // P * P] >= own).all()), "earlier whole pages: prefix region"
        assert bool((slots[st // P * P:] < own).all()) and bool((slots >= P).all())
    for layer in range(L):
        for r, st in zip(rows, starts):                           # the backend's restaging
            if st:
                s.write_layer(layer, s.slots(r, 0, st), kv[r][0, layer, :st], kv[r][1, layer, :st])
        k_new = torch.cat([kv[r][0, layer, st:e] for r, st, e in zip(rows, starts, ends)])
        v_new = torch.cat([kv[r][1, layer, st:e] for r, st, e in zip(rows, starts, ends)])
        s.pool.k_buffer[layer][new] = k_new                       # SGLang's set_kv_buffer
        s.pool.v_buffer[layer][new] = v_new
        s.pool.k_buffer[layer][:P] = float("nan")                 # padded writes land on page 0
        for r, e in zip(rows, ends):                              # what the layer attends
            slots = s.slots(r, 0, e)
            assert torch.equal(s.pool.k_buffer[layer][slots], kv[r][0, layer]), (seed, layer, r)
            assert torch.equal(s.pool.v_buffer[layer][slots], kv[r][1, layer]), (seed, layer, r)
    for layer in range(L):                                        # the sync after the last layer
        for r, st, e in zip(rows, starts, ends):
            slots = s.slots(r, st, e)
            assert torch.equal(s.pool.k_buffer[layer][slots], kv[r][0, layer, st:]), (seed, layer)
            assert torch.equal(s.pool.v_buffer[layer][slots], kv[r][1, layer, st:]), (seed, layer)


def test_a_batch_beyond_the_area_is_refused_with_its_sizes():
    from vortex_hybrid.kv.errors import OutOfPagesError
    s = staging(own=3 * P, prefix=2 * P)
    with pytest.raises(OutOfPagesError, match=r"needs 16 staging slots for its own pages and 0"):
        s.place([0], [0], [9])
    with pytest.raises(OutOfPagesError, match=r"and 12 for earlier chunks; the staging area has "
                                              r"12 and 8"):
        s.place([0], [12], [13])


def test_another_kv_layout_is_refused_with_a_line(monkeypatch):
    from sglang.srt import environ

    from vortex_hybrid.integrations.sglang.config import ConfigError
    monkeypatch.setattr(environ.envs.SGLANG_USE_HND_KVCACHE, "get", lambda: True)
    with pytest.raises(ConfigError, match="layout 'hnd' .*needs SGLang's default 'nhd' layout"):
        staging(own=3 * P, prefix=2 * P)
