"""The backend's hooks for SGLang's decode CUDA graphs, with real SGLang objects and no engine (no
CUDA here: the "graph" runs eagerly): the calls SGLang's decode graph runner makes, in its order
(`DecodeCudaGraphRunner.capture_one_shape` / `load_batch`): `init_cuda_graph_state`, per bucket
`init_forward_metadata_out_graph(in_capture=True)`, two warm-up forwards each followed by
`on_after_cuda_graph_warmup`, the capture's forward; then per decode batch the replay-time
`init_forward_metadata_out_graph` over SGLang's padded view of the batch and the forward the graph
replays. Capture-time and replay-time keys are equal (the backend refuses otherwise); the real
rows equal SGLang's `TorchNativeAttnBackend` at full budget in every placement and the float64
reference at a sparse budget; padding rows, and a row the runtime refused, return zeros.
"""

from __future__ import annotations

import types

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

from test_sglang_backend import HKV, HQ, L, D, PLACEMENTS, World, cfg_for, sparse_reference

from vortex_hybrid.integrations.sglang import sizing

BUCKETS = (4, 2, 1)                       # SGLang captures the large buckets first


def run_layers(world: World, fb, qkv) -> list[torch.Tensor]:
    with forward_context(ForwardContext(attn_backend=world.ours)):
        return [layer(q.flatten(1), k, v, fb).view(-1, HQ, D)
                for layer, (q, k, v) in zip(world.layers, qkv)]


def capture(world: World) -> dict:
    """SGLang's capture of every bucket: {bucket: the static batch its graph reads}."""
    backend = world.ours
    backend.init_cuda_graph_state(max(BUCKETS), max(BUCKETS))
    fill = backend.get_cuda_graph_seq_len_fill_value()
    static = {}
    for bs in BUCKETS:
        fb = ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=bs,
                          input_ids=torch.zeros(bs, dtype=torch.long),
                          req_pool_indices=torch.zeros(bs, dtype=torch.int64),
                          seq_lens=torch.full((bs,), fill), seq_lens_cpu=torch.full((bs,), fill),
                          out_cache_loc=torch.zeros(bs, dtype=torch.int64), seq_lens_sum=bs * fill)
        backend.init_forward_metadata_out_graph(fb, in_capture=True)
        zeros = [tuple(torch.zeros(bs, h, D) for h in (HQ, HKV, HKV)) for _ in range(L)]
        for _ in range(2):                                   # warm-up runs
            run_layers(world, fb, zeros)
            backend.on_after_cuda_graph_warmup()
        run_layers(world, fb, zeros)                         # the capture's forward
        static[bs] = fb
    return static


def replay(world: World, static: dict, rows: list[int], fail: tuple = ()):
    """One decode step of `rows` through the bucket's "graph" (the oracle on the unpadded batch
    first); rows in `fail` were refused by the runtime. Returns (qkv, want, got [real rows])."""
    n = len(rows)
    bs = min(b for b in BUCKETS if b >= n)
    qkv = [tuple(torch.randn(n, h, D, generator=world.gen) for h in (HQ, HKV, HKV))
           for _ in range(L)]
    for r in rows:
        world.place(r, world.kv[r][0].shape[1], 1)
    want = world.forward(world.oracle, rows, [1] * n, ForwardMode.DECODE, qkv)
    seq = [world.kv[r][0].shape[1] + 1 for r in rows]
    fill = world.ours.get_cuda_graph_seq_len_fill_value()
    pad = bs - n
    view = types.SimpleNamespace(                # build_replay_fb_view's fields the backend reads
        batch_size=bs, forward_mode=ForwardMode.DECODE, num_padding=pad,
        req_pool_indices=torch.tensor(rows + [0] * pad),
        seq_lens=torch.tensor(seq + [fill] * pad), seq_lens_cpu=torch.tensor(seq + [fill] * pad),
        out_cache_loc=torch.cat([torch.tensor([int(world.req_pool.req_to_token[r, s - 1])
                                               for r, s in zip(rows, seq)]),
                                 torch.zeros(pad, dtype=torch.int64)]))
    world.ours.init_forward_metadata_out_graph(view)
    fb = static[bs]                              # the graph replays over its static batch
    fb.out_cache_loc = view.out_cache_loc
    padded = [tuple(torch.cat([x, torch.full((pad, *x.shape[1:]), 7.0)]) for x in layer)
              for layer in qkv]
    got = run_layers(world, fb, padded)
    for layer in got:
        assert not layer[n:].any(), "padding rows attend nothing"
        for i, r in enumerate(rows):
            if r in fail:
                assert not layer[i].any(), "a refused row is a padding row"
    for r, k_v in zip(rows, range(n)):           # the test's copy of the KV
        for j in range(2):
            kv_new = torch.stack([qkv[layer][1 + j][k_v:k_v + 1] for layer in range(L)])
            world.kv[r][j] = torch.cat([world.kv[r][j], kv_new], 1)
    return qkv, want, [g[:n] for g in got]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_graph_replays_equal_sglang_torch_native_at_full_budget(placement):
    seed = 3000 + PLACEMENTS.index(placement)
    print(f"seed {seed}")
    world = World(cfg_for(placement), seed)
    try:
        a, b, c = world.new_row(), world.new_row(), world.new_row()
        world.step([a, b, c], [13, 6, 9])
        static = capture(world)
        assert set(world.ours.graph_keys) == set(BUCKETS)
        for i in range(6):
            rows = [a, b, c] if i % 3 else [b]
            _, want, got = replay(world, static, rows)
            for layer in range(L):
                torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5,
                                           msg=f"{placement} step {i} layer {layer}")
        d = world.new_row()                      # an extend between replays finishes the step
        world.step([d], [5])
        _, want, got = replay(world, static, [a, b, c, d])
        for layer in range(L):
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    finally:
        world.ours.runtime.close()


@pytest.mark.parametrize("placement", ["gpu", "hybrid"])
def test_graph_replays_at_a_sparse_budget_equal_the_reference_and_refused_rows_pad(placement):
    seed = 4000 + PLACEMENTS.index(placement)
    print(f"seed {seed}")
    cfg = cfg_for(placement, budget=4)
    world = World(cfg, seed)
    try:
        a, b, c = world.new_row(), world.new_row(), world.new_row()
        world.step([a, b, c], [21, 30, 9])
        static = capture(world)
        gen = int(world.req_pool.req_generation[b]) if hasattr(world.req_pool, "req_generation") \
            else 0
        for i in range(5):
            fail = (b,) if i >= 3 else ()
            if i == 3:                          # as the backend marks a refused row: after
                world.ours._end_graph_step()     # the step that held it was finished
                sizing.FAILED[(b, gen)] = "refused in this test"
                world.ours.requests.drop(b)
            qkv, _, got = replay(world, static, [a, b, c], fail)
            for layer in range(L):
                for j, row in enumerate([a, b, c]):
                    if row in fail:
                        continue
                    k, v = world.kv[row][0][layer], world.kv[row][1][layer]
                    expect = sparse_reference(cfg, qkv[layer][0][j:j + 1], k, v)
                    torch.testing.assert_close(got[layer][j].double(), expect, rtol=1e-4,
                                               atol=1e-5)
    finally:
        sizing.FAILED.clear()
        world.ours.runtime.close()


def test_a_replay_whose_key_differs_from_the_captured_one_is_refused():
    world = World(cfg_for("gpu"), 5)
    try:
        a = world.new_row()
        world.step([a], [6])
        static = capture(world)
        world.ours.graph_keys[1] = ("another",)
        with pytest.raises(RuntimeError, match="differs from the one captured"):
            replay(world, static, [a])
        gen = int(world.req_pool.req_generation[a]) if hasattr(world.req_pool, "req_generation") \
            else 0
        assert world.ours.requests.holding(a, gen, 6) is not None, "the step was undone"
    finally:
        world.ours.runtime.close()


def test_cuda_graph_state_is_taken_without_any_opt_in():
    """The former refusal of SGLang's decode graphs is gone: the graph state is set up with no
    environment variable or flag, its tables as wide as SGLang's longest request in pages."""
    world = World(cfg_for("gpu"), 0)
    try:
        world.ours.init_cuda_graph_state(8, 8)
        context = int(world.req_pool.req_to_token.shape[1])
        assert world.ours._graph_shape(4).max_pages == -(-context // world.ours.cfg.page_size)
    finally:
        world.ours.runtime.close()


def world_whose_next_cpu_part_fails(monkeypatch, seed: int) -> tuple:
    """(world, its captured buckets, rows a and b of 21 and 30 tokens) with the `cpu` placement,
    whose runtime's next CPU part raises RuntimeError("injected in the CPU part"); later ones
    run."""
    world = World(cfg_for("cpu", budget=4), seed)
    print(f"seed {seed}")
    a, b = world.new_row(), world.new_row()
    world.step([a, b], [21, 30])
    static = capture(world)
    runtime = world.ours.runtime
    real, calls = runtime._cpu_state, {"n": 0}

    def boom(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected in the CPU part")
        return real(*args, **kw)
    monkeypatch.setattr(runtime, "_cpu_state", boom)
    return world, static, a, b


def assert_aborted_by_the_injected_error(a: int, b: int) -> None:
    """Rows a and b are marked for the scheduler to abort, the injected error named."""
    failed = {key: msg for key, msg in sizing.FAILED.items() if key[0] in (a, b)}
    assert len(failed) == 2 and all("injected in the CPU part" in m for m in failed.values())


def assert_the_joined_row_is_served(world, static, a: int, b: int, c: int) -> None:
    """A replay of a, b (aborted: padding) and c (joined since): c's outputs are the oracle's."""
    _, want, got = replay(world, static, [a, b, c], fail=(a, b))
    for layer in range(L):
        torch.testing.assert_close(got[layer][2], want[layer][2], rtol=1e-4, atol=1e-5)


def test_a_graph_step_whose_cpu_part_fails_aborts_its_requests_not_the_engine(monkeypatch):
    """The CPU part of a replayed step raises: at the backend's next call the step is undone and
    its rows are marked for the scheduler to abort (`sizing.FAILED`, the error named); the next
    replay treats them as padding and serves a request that joins later."""
    world, static, a, b = world_whose_next_cpu_part_fails(monkeypatch, 6)
    try:
        replay(world, static, [a, b])
        c = world.new_row()
        world.step([c], [6])                     # the next call: the failed step is finished
        assert_aborted_by_the_injected_error(a, b)
        assert len(world.ours.requests) == 1     # a's and b's runtime requests are gone
        assert_the_joined_row_is_served(world, static, a, b, c)
    finally:
        sizing.FAILED.clear()
        world.ours.runtime.close()


def test_a_failure_found_by_the_next_replay_aborts_the_step_before_and_plans_the_batch_again(
        monkeypatch):
    """A replayed step ends without waiting and its CPU part raised: the next replay's plan()
    finds it; its rows are marked for the scheduler to abort (the error named), that batch is
    planned again with them as padding (they return zeros), and a request that joins later is
    served as the oracle serves it."""
    world, static, a, b = world_whose_next_cpu_part_fails(monkeypatch, 8)
    runtime = world.ours.runtime
    try:
        ends, finish = [], runtime.finish_step

        def finish_step(wait=True):
            ends.append(wait)
            return finish(wait=wait)
        monkeypatch.setattr(runtime, "finish_step", finish_step)
        replay(world, static, [a, b])                  # ended at the next call, without waiting
        replay(world, static, [a, b], fail=(a, b))     # whose plan() finds the failure
        assert ends == [False]
        assert_aborted_by_the_injected_error(a, b)
        assert len(world.ours.requests) == 0
        c = world.new_row()
        world.step([c], [6])
        assert_the_joined_row_is_served(world, static, a, b, c)
    finally:
        sizing.FAILED.clear()
        world.ours.runtime.close()
