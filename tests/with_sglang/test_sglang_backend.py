"""`VortexHybridBackend` with real SGLang objects and no engine: `ReqToTokenPool`,
`MHATokenToKVPool`, hand-made `ForwardBatch`es and `RadixAttention` layers, inside SGLang's
forward context. At full budget every placement returns what SGLang's `TorchNativeAttnBackend`
returns for the same batches (a peer implementation as the oracle); sparse placements return the
float64 reference over the flow's selection. Prefix-cache hits, chunked prefill and recycled
request-pool rows are in the batches."""

from __future__ import annotations

import types

import pytest
import torch
from sglang.srt.configs.model_config import AttentionArch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

from vortex_hybrid import HybridConfig, reference, vflow
from vortex_hybrid.integrations.sglang.backend import VortexHybridBackend
from vortex_hybrid.integrations.sglang.config import ConfigError

L, HQ, HKV, D, P = 2, 4, 2, 16, 4
PLACEMENTS = ["dense", "gpu", "cpu", "offload", "hybrid"]


class World:
    """One SGLang KV pool and request pool, shared by our backend and the oracle backend; slots
    handed out page by page (SGLang's paged allocation), rows through the pool's own alloc."""

    def __init__(self, cfg: HybridConfig, seed: int, runtime_tokens: int = 2048):
        self.gen = torch.Generator().manual_seed(seed)
        self.req_pool = ReqToTokenPool(size=4, max_context_len=256, device="cpu",
                                       enable_memory_saver=False)
        self.kv_pool = MHATokenToKVPool(size=2048, page_size=P, dtype=torch.float32, head_num=HKV,
                                        head_dim=D, layer_num=L, device="cpu",
                                        enable_memory_saver=False)
        mc = types.SimpleNamespace(num_hidden_layers=L, num_attention_heads=HQ,
                                   num_key_value_heads=HKV, head_dim=D, v_head_dim=D,
                                   attention_arch=AttentionArch.MHA, is_hybrid_swa=False,
                                   hf_config=types.SimpleNamespace(architectures=["Tiny"]),
                                   hf_text_config=types.SimpleNamespace())
        runner = types.SimpleNamespace(device="cpu", req_to_token_pool=self.req_pool,
                                       token_to_kv_pool=self.kv_pool, model_config=mc,
                                       max_total_num_tokens=runtime_tokens)
        self.ours = VortexHybridBackend(runner, cfg)
        self.oracle = TorchNativeAttnBackend(runner)
        self.layers = [RadixAttention(num_heads=HQ, head_dim=D, scaling=D ** -0.5,
                                      num_kv_heads=HKV, layer_id=i) for i in range(L)]
        self.next_page = 1
        self.kv: dict[int, list] = {}             # row -> [k [L, T, Hkv, D], v] as written
        self.rid: dict[int, str] = {}             # row -> its request's id (SGLang's `rids`)
        self.requests = 0

    def new_row(self) -> int:
        """A row for a new request, as SGLang's scheduler takes one (its generation bumped)."""
        if hasattr(self.req_pool, "alloc_rows"):                  # sglang 0.5.21
            row, = self.req_pool.alloc_rows(1)
        else:                                                       # 0.5.17: alloc(reqs)
            req = types.SimpleNamespace(req_pool_idx=None, inflight_middle_chunks=0,
                                        kv_committed_len=0)
            row, = self.req_pool.alloc([req])
        self.kv[row] = [torch.zeros(L, 0, HKV, D), torch.zeros(L, 0, HKV, D)]
        self.requests += 1
        self.rid[row] = f"req-{self.requests}"
        return row

    def free_row(self, row: int, seen: bool = True) -> None:
        """The request in `row` finished, as SGLang frees it; seen=False: through SGLang's class
        method, past the backend's watch of its pool object."""
        pool, cls = self.req_pool, ReqToTokenPool
        if hasattr(pool, "free_rows"):                              # sglang 0.5.21
            (pool.free_rows if seen else lambda rows: cls.free_rows(pool, rows))([row])
        else:
            req = types.SimpleNamespace(req_pool_idx=row)
            (pool.free if seen else lambda r: cls.free(pool, r))(req)
        del self.kv[row]

    def place(self, row: int, start: int, n: int) -> torch.Tensor:
        """Slots for tokens [start, start + n) of `row` (new pages as needed); their locations."""
        for t in range(start, start + n):
            if t % P == 0:
                self.req_pool.req_to_token[row, t:t + P] = \
                    torch.arange(self.next_page * P, (self.next_page + 1) * P)
                self.next_page += 1
        return self.req_pool.req_to_token[row, start:start + n].to(torch.int64)

    def share_prefix(self, src: int, dst: int, n: int) -> None:
        """A prefix-cache hit: `dst`'s first n tokens (whole pages) are `src`'s slots."""
        self.req_pool.req_to_token[dst, :n] = self.req_pool.req_to_token[src, :n]
        self.kv[dst] = [self.kv[src][0][:, :n].clone(), self.kv[src][1][:, :n].clone()]

    def forward(self, backend, rows: list[int], new: list[int], mode, qkv) -> list[torch.Tensor]:
        """Every layer's output for one batch: rows get `new` tokens each (their slots were placed)."""
        seq = [self.kv[r][0].shape[1] + n for r, n in zip(rows, new)]
        loc = torch.cat([self.req_pool.req_to_token[r, s - n:s].to(torch.int64)
                         for r, s, n in zip(rows, seq, new)])
        fb = ForwardBatch(forward_mode=mode, batch_size=len(rows),
                          input_ids=torch.zeros(sum(new), dtype=torch.long),
                          req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(seq),
                          out_cache_loc=loc, seq_lens_sum=sum(seq),
                          extend_prefix_lens=torch.tensor([s - n for s, n in zip(seq, new)]),
                          extend_seq_lens=torch.tensor(new), seq_lens_cpu=torch.tensor(seq),
                          rids=[self.rid[r] for r in rows])
        backend.init_forward_metadata(fb)
        outs = []
        with forward_context(ForwardContext(attn_backend=backend)):
            for layer, (q, k, v) in zip(self.layers, qkv):
                outs.append(layer(q.flatten(1), k, v, fb).view(-1, HQ, D))
        return outs

    def step(self, rows: list[int], new: list[int], mode=ForwardMode.EXTEND):
        """The batch through the oracle, then (same inputs, same pool) through ours."""
        qkv = [tuple(torch.randn(sum(new), h, D, generator=self.gen) for h in (HQ, HKV, HKV))
               for _ in range(L)]
        for r, n in zip(rows, new):
            self.place(r, self.kv[r][0].shape[1], n)
        want = self.forward(self.oracle, rows, new, mode, qkv)
        got = self.forward(self.ours, rows, new, mode, qkv)
        off = 0
        for r, n in zip(rows, new):
            for i, kv in enumerate(self.kv[r]):
                kv_new = torch.stack([qkv[layer][1 + i][off:off + n] for layer in range(L)])
                self.kv[r][i] = torch.cat([kv, kv_new], 1)
            off += n
        return qkv, want, got


def cfg_for(placement: str, budget=None) -> HybridConfig:
    return HybridConfig(page_size=P, placement=placement, kv_dtype="float32",
                        budget_pages=budget, budget_ratio=None if budget else 1.0,
                        sink_pages=1, recent_pages=2, gpu_cache_pages=6)


def scenario(world: World, check) -> None:
    """Joins, a prefix-cache hit, a chunked prefill, decode steps, a finished request whose row
    is recycled, more decode steps; `check(rows, qkv, want, got, mode)` after each batch."""
    a, b = world.new_row(), world.new_row()
    check([a, b], *world.step([a, b], [13, 6]), ForwardMode.EXTEND)
    for _ in range(3):
        check([a, b], *world.step([a, b], [1, 1], ForwardMode.DECODE), ForwardMode.DECODE)
    c = world.new_row()
    world.share_prefix(a, c, 12)                                   # prefix hit of 3 pages
    check([c], *world.step([c], [5]), ForwardMode.EXTEND)
    d = world.new_row()
    check([d], *world.step([d], [9]), ForwardMode.EXTEND)         # chunk 1 of d
    check([b, d], *world.step([b, d], [1, 7]), ForwardMode.EXTEND)  # chunk 2, b's extend too
    world.free_row(a)                                              # a finishes: row recycled
    e = world.new_row()
    assert e == a, "SGLang's pool hands the freed row to the next request"
    check([e], *world.step([e], [3]), ForwardMode.EXTEND)
    for _ in range(5):
        rows = [b, c, d, e]
        check(rows, *world.step(rows, [1] * 4, ForwardMode.DECODE), ForwardMode.DECODE)
    assert world.ours.stats()["requests"] == 4


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_full_budget_equals_sglang_torch_native_for_extend_and_decode(placement):
    seed = 1000 + PLACEMENTS.index(placement)
    print(f"seed {seed}")
    world = World(cfg_for(placement), seed)

    def check(rows, qkv, want, got, mode):
        for layer in range(L):
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5,
                                       msg=f"{placement} {mode.name} layer {layer}")

    scenario(world, check)
    world.ours.runtime.close()


@pytest.mark.parametrize("placement", ["gpu", "cpu", "offload", "hybrid"])
def test_sparse_decode_equals_the_reference_over_the_flow_selection(placement):
    seed = 2000 + PLACEMENTS.index(placement)
    print(f"seed {seed}")
    cfg = cfg_for(placement, budget=4)
    world = World(cfg, seed)
    decoded = []

    def check(rows, qkv, want, got, mode):
        if mode != ForwardMode.DECODE:            # prefill is dense in every placement
            for layer in range(L):
                torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
            return
        for layer in range(L):
            q = qkv[layer][0]
            for i, row in enumerate(rows):
                k, v = world.kv[row][0][layer], world.kv[row][1][layer]   # this step's included
                expect = sparse_reference(cfg, q[i:i + 1], k, v)
                torch.testing.assert_close(got[layer][i].double(), expect, rtol=1e-4, atol=1e-5)
        decoded.append(len(rows))

    scenario(world, check)
    assert sum(decoded) == 3 * 2 + 5 * 4
    totals = world.ours.stats()["totals"]
    if placement in ("cpu", "hybrid"):                 # host pages were attended where they are
        assert totals["cpu_pages"] > 0, totals
    if placement in ("offload", "hybrid"):
        assert totals["fetched_pages"] + totals["cache_hits"] > 0, totals
    world.ours.runtime.close()


def sparse_reference(cfg: HybridConfig, q, k, v) -> torch.Tensor:
    """float64 attention of q [1, Hq, D] over the pages the flow selects from k, v [T, Hkv, D]."""
    T = k.shape[0]
    n = -(-T // P)
    pad = n * P - T
    kp, vp = (torch.cat([x, torch.zeros(pad, HKV, D)]).reshape(n, P, HKV, D).transpose(1, 2)
              .contiguous() for x in (k, v))
    table = torch.arange(n, dtype=torch.int32)[None]
    lens = torch.tensor([T], dtype=torch.int32)
    sel = vflow.select_pages(cfg.flow, q, kp, table, lens, cfg.budget_for(n), cfg.sink_pages,
                             cfg.recent_pages)
    o, _ = reference.sparse_decode_attention(q.double(), kp.double(), vp.double(), table, lens, sel)
    return o[0]


@pytest.mark.parametrize("seen", ["free seen", "generation only"])
def test_a_recycled_row_never_reads_the_finished_requests_kv(seen):
    """A row recycled to a new request of the same length: its decode equals torch_native over its
    own KV only (a stale runtime request would hold the old request's tokens). "generation only":
    the backend misses the pool's free (SGLang's class method called directly), so only the row's
    generation tells the new request from the old."""
    world = World(cfg_for("gpu"), 7)
    print("seed 7")
    held = [world.new_row() for _ in range(3)]
    a = world.new_row()
    world.step([a], [8])
    world.free_row(a, seen=seen == "free seen")
    b = world.new_row()
    assert b == a, "the pool hands the freed row to the next request"
    world.step([b], [8])
    _, want, got = world.step([b], [1], ForwardMode.DECODE)
    for layer in range(L):
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    assert world.ours.stats()["requests"] == 1 and len(held) == 3


def test_decode_batches_take_their_rows_from_the_requests_seen_in_extends():
    """A decode batch whose requests were all seen in an extend batch takes their rows from the
    backend's record (no read of the device's `req_pool_indices`, which would wait for the GPU's
    running step); an unknown request, a row handed to another request since (its generation
    moved) or a batch without `rids` reads the device tensor; the outputs equal torch_native's
    throughout (seed 5)."""
    world = World(cfg_for("gpu"), 5)
    print("seed 5")
    ours = world.ours

    def check(rows, new, mode):
        _, want, got = world.step(rows, new, mode)
        for layer in range(L):
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)

    a, b = world.new_row(), world.new_row()
    check([a, b], [9, 5], ForwardMode.EXTEND)
    reads = ours.device_row_reads
    for _ in range(3):
        check([a, b], [1, 1], ForwardMode.DECODE)
    assert ours.device_row_reads == reads                  # rows from the extend's record
    world.rid[b] = "never-seen"                            # a request no extend showed
    check([a, b], [1, 1], ForwardMode.DECODE)
    assert ours.device_row_reads == reads + 1
    check([a, b], [1, 1], ForwardMode.DECODE)              # recorded by that read
    assert ours.device_row_reads == reads + 1
    old = world.rid[a]
    held = [world.new_row() for _ in range(2)]             # the pool full: a's row comes back
    world.free_row(a)                                      # a finishes; its row goes to c
    c = world.new_row()
    assert len(held) == 2
    assert c == a
    check([c], [4], ForwardMode.EXTEND)
    world.rid[c] = old                                     # the finished request's id, row moved on
    before = ours.device_row_reads
    check([c, b], [1, 1], ForwardMode.DECODE)              # its generation tells: device read
    assert ours.device_row_reads == before + 1


def test_a_layer_with_another_scaling_is_refused():
    world = World(cfg_for("gpu"), 0)
    world.layers[0] = RadixAttention(num_heads=HQ, head_dim=D, scaling=0.5, num_kv_heads=HKV,
                                     layer_id=0)
    a = world.new_row()
    with pytest.raises(ConfigError, match=r"layer 0: scaling 0.5 is not head_dim \*\* -0.5"):
        world.step([a], [4])


def test_prefill_times_log_one_line_per_extend_batch_and_change_no_output(monkeypatch, caplog):
    """VORTEX_HYBRID_PREFILL_TIMES=1: each extend batch logs one line with its phases (staging,
    the model's forward, the sync into the runtime) and its size; decode batches log none; the
    outputs still equal SGLang's torch-native backend (seed 1200)."""
    from vortex_hybrid.integrations.sglang.backend import PREFILL_TIMES_ENV
    monkeypatch.setenv(PREFILL_TIMES_ENV, "1")
    world = World(cfg_for("hybrid"), 1200)
    a, b = world.new_row(), world.new_row()
    with caplog.at_level("INFO", logger="vortex_hybrid.integrations.sglang.backend"):
        for rows, new, mode in (([a, b], [13, 6], ForwardMode.EXTEND),
                                ([a, b], [1, 1], ForwardMode.DECODE),
                                ([b], [7], ForwardMode.EXTEND)):
            _, want, got = world.step(rows, new, mode)
            for layer in range(L):
                torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    lines = [r.getMessage() for r in caplog.records if "prefill batch" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("vortex_hybrid prefill batch: 2 rows, 19 new tokens, 0 read back")
    assert lines[1].startswith("vortex_hybrid prefill batch: 1 rows, 7 new tokens"), lines[1]
    for line in lines:
        assert all(f"{phase} " in line and " ms" in line
                   for phase in ("staging", "model", "sync into the runtime")), line
    world.ours.runtime.close()


def test_prefill_times_profile_logs_the_syncs_top_ops_for_the_first_batches_only(monkeypatch,
                                                                                 caplog):
    """VORTEX_HYBRID_PREFILL_TIMES=profile: the first PROFILED_SYNCS extend batches log their
    line and then a table of the sync's top ops (the runtime's own ops among them); later ones
    only their line; the outputs still equal SGLang's torch-native backend (seed 1201)."""
    from vortex_hybrid.integrations.sglang import backend as backend_mod
    monkeypatch.setenv(backend_mod.PREFILL_TIMES_ENV, "profile")
    monkeypatch.setattr(backend_mod, "PROFILED_SYNCS", 2)
    world = World(cfg_for("hybrid"), 1201)
    a, b, c = world.new_row(), world.new_row(), world.new_row()
    with caplog.at_level("INFO", logger="vortex_hybrid.integrations.sglang.backend"):
        for rows, new in (([a], [9]), ([b], [5]), ([c], [6])):
            _, want, got = world.step(rows, new, ForwardMode.EXTEND)
            for layer in range(L):
                torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    msgs = [r.getMessage() for r in caplog.records]
    lines = [m for m in msgs if m.startswith("vortex_hybrid prefill batch")]
    tables = [m for m in msgs if m.startswith("vortex_hybrid prefill sync into the runtime, top")]
    assert len(lines) == 3 and len(tables) == 2, msgs
    assert msgs.index(tables[0]) == msgs.index(lines[0]) + 1       # each after its batch's line
    assert all("Self CPU" in t and "aten::" in t for t in tables), tables[0]
    world.ours.runtime.close()


def test_prefill_times_line_counts_the_restaging_inside_the_models_phase():
    """A batch that read earlier chunks back: the model's phase names the share of it spent
    restaging (the spans timed by `restage()`, summed); a batch that read none says nothing of
    it."""
    import time as _time

    from vortex_hybrid.integrations.sglang.backend import _PrefillTimes
    times = _PrefillTimes(torch.device("cpu"))
    times.mark("start")
    times.mark("staging")
    for _ in range(2):
        with times.restage():
            _time.sleep(0.02)
    times.mark("model")
    times.mark("sync into the runtime")
    times.read_back = 24
    line = times.line(1, 8)
    assert line.startswith("vortex_hybrid prefill batch: 1 rows, 8 new tokens, 24 read back")
    restaged = float(line.split("restaging earlier chunks ")[1].split(" ms")[0])
    model = float(line.split("model ")[1].split(" ms")[0])
    assert 40.0 <= restaged <= model, line
    times.read_back = 0
    assert "restaging" not in times.line(1, 8)


def test_a_profiler_that_cannot_start_leaves_the_sync_to_run_unprofiled(monkeypatch):
    """`_profiled` when the profiler cannot start (e.g. another one holds the device's profiling):
    fn runs once, unprofiled, and the table names why; otherwise the table lists fn's ops."""
    import torch.profiler

    from vortex_hybrid.integrations.sglang.backend import _profiled
    ran = []

    def fn():
        ran.append(1)
        torch.ones(64).cumsum(0)

    table = _profiled(fn, torch.device("cpu"))
    assert ran == [1] and "aten::cumsum" in table, table

    class Busy:
        def __init__(self, **kw):
            pass

        def __enter__(self):
            raise RuntimeError("Profiler is already enabled")

    monkeypatch.setattr(torch.profiler, "profile", Busy)
    inner = _profiled(fn, torch.device("cpu"))
    assert ran == [1, 1], ran
    assert inner == "(not profiled: RuntimeError: Profiler is already enabled)", inner
