"""The paged KV substrate: a hypothesis state machine over requests, plus targeted edge cases."""

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vortex_hybrid.kv import (KVCacheError, NOT_RESIDENT, OutOfPagesError, PageAllocator,
                              PageOwnershipError, PagedKVCache, UnknownRequestError)

L, H, D, P = 2, 2, 4, 4


def new_cache(device_pages=12, host_pages=10, dtype=torch.bfloat16):
    return PagedKVCache(L, H, D, P, device_pages=device_pages, host_pages=host_pages, dtype=dtype,
                        device="cpu")


class KVMachine(RuleBasedStateMachine):
    """Random create / append / offload / load / evict / free across several requests.

    The model keeps every request's expected K/V; invariants check ownership, accounting, and that
    each request reads back exactly its own tokens from whichever copy each page has.
    """

    @initialize()
    def setup(self):
        self.kv = new_cache()
        self.data = {}        # rid -> (k [L, T, H, D], v)
        self.filled = set()   # (rid, layer, logical page) reported by the page-filled listener
        self.kv.add_page_filled_listener(
            lambda rid, layer, ps, devs: self.filled.update((rid, layer, p) for p in ps))

    @rule()
    def create(self):
        rid = self.kv.create_request()
        self.data[rid] = (torch.empty(L, 0, H, D, dtype=torch.bfloat16),) * 2

    @precondition(lambda self: self.data)
    @rule(pick=st.integers(0, 99), n=st.integers(1, 9))
    def append(self, pick, n):
        rid = sorted(self.data)[pick % len(self.data)]
        k = torch.randn(L, n, H, D).to(torch.bfloat16)
        v = torch.randn(L, n, H, D).to(torch.bfloat16)
        used_before = self.kv.device_alloc.num_used
        snapshot = {r: self.kv.read(r, 0) for r in self.data}
        try:
            self.kv.append(rid, k, v)
        except OutOfPagesError:
            assert self.kv.device_alloc.num_used == used_before
            for r, (k0, v0) in snapshot.items():   # nothing existing was touched
                k1, v1 = self.kv.read(r, 0)
                assert torch.equal(k0, k1) and torch.equal(v0, v1)
            return
        k0, v0 = self.data[rid]
        self.data[rid] = (torch.cat([k0, k], 1), torch.cat([v0, v], 1))

    @precondition(lambda self: self.data)
    @rule(pick=st.integers(0, 99), frac=st.floats(0, 1))
    def offload(self, pick, frac):
        rid = sorted(self.data)[pick % len(self.data)]
        full = self.kv.num_full_pages(rid)
        pages = list(range(full))[: int(frac * full)]
        try:
            self.kv.offload(rid, pages)
        except OutOfPagesError:
            return
        assert all(self.kv.residency(rid)[p][0] == NOT_RESIDENT for p in pages)

    @precondition(lambda self: self.data)
    @rule(pick=st.integers(0, 99), frac=st.floats(0, 1))
    def load(self, pick, frac):
        rid = sorted(self.data)[pick % len(self.data)]
        n = self.kv.num_pages(rid)
        pages = list(range(n))[: int(frac * n)]
        try:
            self.kv.load(rid, pages)
        except OutOfPagesError:
            return
        assert all(self.kv.residency(rid)[p][0] != NOT_RESIDENT for p in pages)

    @precondition(lambda self: self.data)
    @rule(pick=st.integers(0, 99))
    def evict(self, pick):
        rid = sorted(self.data)[pick % len(self.data)]
        both = [p for p, (d, h) in enumerate(self.kv.residency(rid))
                if d != NOT_RESIDENT and h != NOT_RESIDENT]
        self.kv.evict(rid, both)

    @precondition(lambda self: self.data)
    @rule(pick=st.integers(0, 99), frac=st.floats(0, 1))
    def truncate(self, pick, frac):
        rid = sorted(self.data)[pick % len(self.data)]
        n = int(frac * self.kv.seq_len(rid))
        tail = (n - 1) // P
        if n % P and self.kv.residency(rid)[tail][0] == NOT_RESIDENT and \
                self.kv.device_alloc.num_free == 0:
            return                          # its partly filled tail would need a device page
        self.kv.truncate(rid, n)
        k, v = self.data[rid]
        self.data[rid] = (k[:, :n], v[:, :n])

    @precondition(lambda self: self.data)
    @rule(pick=st.integers(0, 99))
    def free(self, pick):
        rid = sorted(self.data)[pick % len(self.data)]
        self.kv.free_request(rid)
        del self.data[rid]
        with pytest.raises(UnknownRequestError):
            self.kv.read(rid, 0)

    @invariant()
    def pages_have_one_owner_and_counts_add_up(self):
        for alloc, column in ((self.kv.device_alloc, 0), (self.kv.host_alloc, 1)):
            owned = []
            for rid in self.data:
                mine = [pair[column] for pair in self.kv.residency(rid) if pair[column] != NOT_RESIDENT]
                assert sorted(mine) == alloc.pages_of(rid)
                owned += mine
            assert len(owned) == len(set(owned))
            assert alloc.num_free + len(owned) == alloc.num_pages

    @invariant()
    def every_request_reads_exactly_its_own_tokens(self):
        """Per layer (`read`), and every layer's token range at once (`read_tokens`: the
        restaging read of a chunked prefill), whichever copy each page has."""
        for rid, (k, v) in self.data.items():
            for layer in range(L):
                k1, v1 = self.kv.read(rid, layer)
                assert torch.equal(k1, k[layer]) and torch.equal(v1, v[layer])
            T = k.shape[1]
            for start, end in ((0, T), (T // 3, T - T // 4), (T, T)):
                k2, v2 = self.kv.read_tokens(rid, start, end)
                assert torch.equal(k2, k[:, start:end]) and torch.equal(v2, v[:, start:end])
            layer = T % L                   # one layer's range (the prefill's per-layer restaging)
            k3, v3 = self.kv.read_tokens(rid, T // 2, T, first_layer=layer, end_layer=layer + 1)
            assert torch.equal(k3, k[layer:layer + 1, T // 2:]) and \
                torch.equal(v3, v[layer:layer + 1, T // 2:])

    @invariant()
    def page_tables_follow_the_residency(self):
        """page_table (its per-request rows are kept between calls and rebuilt only from a
        change on) equals the table written out from each page's residency."""
        rids = sorted(self.data)
        if not rids:
            return
        width = max(self.kv.num_pages(r) for r in rids) + 1
        for column, where in ((0, "device"), (1, "host")):
            got, lens = self.kv.page_table(rids, where, max_pages=width)
            want = torch.full((len(rids), width), NOT_RESIDENT, dtype=torch.int32)
            for b, rid in enumerate(rids):
                for p, pair in enumerate(self.kv.residency(rid)):
                    want[b, p] = pair[column]
            assert torch.equal(got.cpu(), want), where
            assert lens.cpu().tolist() == [self.kv.seq_len(r) for r in rids]

    @invariant()
    def filled_pages_were_reported(self):
        for rid, (k, _) in self.data.items():
            for p in range(k.shape[1] // P):
                assert all((rid, layer, p) in self.filled for layer in range(L))


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_offload_then_load_is_bit_exact_in_every_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        kv = new_cache(dtype=dtype)
        rid = kv.create_request()
        k = torch.randn(L, 13, H, D).to(dtype)
        v = torch.randn(L, 13, H, D).to(dtype)
        kv.append(rid, k, v)
        kv.offload(rid, [0, 1, 2])
        assert [d for d, _ in kv.residency(rid)] == [NOT_RESIDENT] * 3 + [kv.residency(rid)[3][0]]
        kv.load(rid, [0, 2])
        kv.evict(rid, [0])
        for layer in range(L):
            k1, v1 = kv.read(rid, layer)
            assert torch.equal(k1.view(torch.uint8), k[layer].view(torch.uint8))
            assert torch.equal(v1.view(torch.uint8), v[layer].view(torch.uint8))


def test_read_tokens_refuses_a_range_outside_the_request():
    kv = new_cache()
    rid = kv.create_request()
    kv.append(rid, torch.randn(L, 6, H, D).bfloat16(), torch.randn(L, 6, H, D).bfloat16())
    for start, end in ((-1, 3), (4, 3), (0, 7)):
        with pytest.raises(ValueError, match=rf"tokens \[{start}, {end}\) outside request"):
            kv.read_tokens(rid, start, end)


def test_out_of_pages_raises_and_leaves_state_intact():
    kv = new_cache(device_pages=3)
    rid = kv.create_request()
    kv.append(rid, torch.randn(L, 10, H, D), torch.randn(L, 10, H, D))
    before = kv.read(rid, 1)
    with pytest.raises(OutOfPagesError, match="needs 2 pages but only 0 of 3 are free"):
        kv.append(rid, torch.randn(L, 7, H, D), torch.randn(L, 7, H, D))
    assert kv.seq_len(rid) == 10
    assert all(torch.equal(a, b) for a, b in zip(before, kv.read(rid, 1)))


def test_requests_cannot_touch_each_others_pages():
    kv = new_cache()
    a, b = kv.create_request(), kv.create_request()
    kv.append(a, torch.randn(L, 8, H, D), torch.randn(L, 8, H, D))
    kv.append(b, torch.randn(L, 4, H, D), torch.randn(L, 4, H, D))
    page_of_a = kv.residency(a)[0][0]
    with pytest.raises(PageOwnershipError, match=f"request {b} addressed page {page_of_a}, which "
                                                 f"belongs to request {a}"):
        kv.device_alloc.free(b, [page_of_a])
    with pytest.raises(ValueError, match="request 1 has full pages 0..0; got logical page 1"):
        kv.offload(b, [1])
    with pytest.raises(UnknownRequestError, match="request 7 does not exist"):
        kv.load(7, [0])


def test_tail_page_cannot_be_offloaded_and_host_only_pages_cannot_be_written():
    kv = new_cache()
    rid = kv.create_request()
    kv.append(rid, torch.randn(L, 6, H, D), torch.randn(L, 6, H, D))
    with pytest.raises(ValueError, match="partly filled tail page stays on the device"):
        kv.offload(rid, [1])
    kv.offload(rid, [0])
    with pytest.raises(KVCacheError, match="not on the device"):
        kv.write(rid, 0, 0, torch.randn(1, H, D), torch.randn(1, H, D))
    with pytest.raises(KVCacheError, match="have no host copy"):
        kv.evict(rid, [1])


def test_free_request_returns_all_pages():
    kv = new_cache()
    rid = kv.create_request()
    kv.append(rid, torch.randn(L, 15, H, D), torch.randn(L, 15, H, D))
    kv.offload(rid, [0, 1])
    kv.load(rid, [1])
    kv.free_request(rid)
    assert kv.device_alloc.num_free == 12 and kv.host_alloc.num_free == 10


def test_page_table_marks_non_resident_pages():
    kv = new_cache()
    rid = kv.create_request()
    kv.append(rid, torch.randn(L, 9, H, D), torch.randn(L, 9, H, D))
    kv.offload(rid, [1])
    dev, lens = kv.page_table([rid], "device", max_pages=5)
    host, _ = kv.page_table([rid], "host")
    assert dev.dtype == torch.int32 and dev.shape == (1, 5) and lens.tolist() == [9]
    assert dev[0, 1] == NOT_RESIDENT and dev[0, 3:].eq(NOT_RESIDENT).all()
    assert host[0].tolist() == [NOT_RESIDENT, kv.residency(rid)[1][1], NOT_RESIDENT]


def test_allocator_rejects_double_free_and_foreign_pages():
    alloc = PageAllocator(4, "test pool")
    pages = alloc.alloc(0, 2)
    with pytest.raises(PageOwnershipError, match="freed a page twice"):
        alloc.free(0, [pages[0], pages[0]])
    with pytest.raises(PageOwnershipError, match="belongs to nobody"):
        alloc.free(0, [3])
    assert alloc.num_used == 2


def test_host_pool_larger_than_cap_is_refused():
    with pytest.raises(ValueError, match="exceed the host memory cap"):
        PagedKVCache(1, 1, 8, 16, 1, 1000, host_memory_cap_bytes=1024, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device pool needs a GPU")
def test_cuda_pool_offload_and_gather_load_are_bit_exact():
    """On a GPU the device pool is in HBM, the host pool pinned (registered at a size no power of
    two), and `load` runs the one-launch gather kernel: every byte must come back as written,
    whatever the dtype."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        kv = PagedKVCache(L, H, D, P, device_pages=16, host_pages=23, dtype=dtype, device="cuda")
        assert kv.host_pool.pinned and kv.host_pool.k.is_pinned() and kv.host_pool.v.is_pinned()
        assert kv.host_pool.k.shape[1] == 23          # registered at its exact size
        rid = kv.create_request()
        k = torch.randn(L, 29, H, D).to(dtype)
        v = torch.randn(L, 29, H, D).to(dtype)
        kv.append(rid, k, v)
        kv.offload(rid, list(range(7)))
        kv.load(rid, [6, 0, 3])
        kv.evict(rid, [3])
        for layer in range(L):
            k1, v1 = kv.read(rid, layer)
            assert torch.equal(k1.view(torch.uint8), k[layer].view(torch.uint8))
            assert torch.equal(v1.view(torch.uint8), v[layer].view(torch.uint8))


def test_truncate_into_an_offloaded_page_makes_it_writable_with_no_stale_host_copy():
    """A page offloaded while full and then cut back to partly filled comes back to the device
    without its host copy: appending refills it, and offloading it again copies the new tokens."""
    kv = new_cache(dtype=torch.float32)
    seen = []
    kv.add_truncated_listener(lambda rid, n: seen.append((rid, n)))
    rid = kv.create_request()
    k = torch.randn(L, 2 * P, H, D)
    kv.append(rid, k, k)
    kv.offload(rid, [0, 1])
    kv.truncate(rid, P + 1)
    assert kv.residency(rid)[1][0] != NOT_RESIDENT and kv.residency(rid)[1][1] == NOT_RESIDENT
    assert seen == [(rid, P + 1)]
    k2 = torch.randn(L, P - 1, H, D)
    kv.append(rid, k2, k2)
    kv.offload(rid, [1])
    want = torch.cat([k[:, :P + 1], k2], 1)
    for layer in range(L):
        assert torch.equal(kv.read(rid, layer)[0], want[layer])


def test_rollback_restores_length_and_residency_from_the_checkpoint():
    kv = new_cache(dtype=torch.float32)
    rid = kv.create_request()
    k = torch.randn(L, P + 2, H, D)
    kv.append(rid, k, k)
    free = (kv.device_alloc.num_free, kv.host_alloc.num_free)
    cp = kv.checkpoint(rid, first_page=0)
    more = torch.randn(L, 3 * P, H, D)
    kv.append(rid, more, more)
    kv.offload(rid, [0, 1, 2])
    kv.rollback(cp)
    assert kv.seq_len(rid) == P + 2
    assert [(d >= 0, h >= 0) for d, h in kv.residency(rid)] == [(True, False), (True, False)]
    assert (kv.device_alloc.num_free, kv.host_alloc.num_free) == free
    for layer in range(L):
        assert torch.equal(kv.read(rid, layer)[0], k[layer])
