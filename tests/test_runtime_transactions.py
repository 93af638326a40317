"""Every public call of HybridAttention is all or nothing, and requests are isolated by
construction: a call that raises (pool exhaustion, bad input, a failure injected at each point it
can happen, the CPU part included) leaves pages, summaries, lengths, the page cache and the counters
exactly as before it, and the next steps still equal the float64 reference. Non-finite K/V are
refused at prefill and reported at decode."""

from __future__ import annotations

import logging

import pytest
import torch
from test_hybrid_attention import HKV, HQ, L, PLACEMENTS, D, P, Shadow, make

from vortex_hybrid import HybridAttention, HybridConfig
from vortex_hybrid.kv import OutOfPagesError, PageOwnershipError, UnknownRequestError
from vortex_hybrid.runtime import hybrid_attention as ha

HOST = ["cpu", "offload", "hybrid"]


def state(attn: HybridAttention) -> dict:
    """Everything a failed call must leave as it was, in comparable form (physical page numbers
    excluded: a rollback may put a page back into another free page, with the same bytes)."""
    kv, out = attn.kv, {}
    for rid in kv.request_ids:
        where = [(d >= 0, h >= 0) for d, h in kv.residency(rid)]
        pages = [kv.read_pages(rid, layer) for layer in range(L)]
        n = kv.seq_len(rid)
        toks = [tuple(t.transpose(1, 2).reshape(-1, HKV, D)[:n].clone() for t in kp)
                for kp in pages]
        rows = attn.store.rows(rid) if attn.store is not None else []
        summ = None
        if attn.store is not None and any(r >= 0 for r in rows):
            idx = torch.tensor([r for r in rows if r >= 0])
            summ = {k: t[:, idx.to(t.device)].cpu().clone() for k, t in attn.store._tensors.items()}
        out[rid] = (n, where, toks, [i for i, r in enumerate(rows) if r >= 0], summ,
                    attn._offloaded.get(rid))
    out["free"] = (kv.device_alloc.num_free, kv.host_alloc.num_free,
                   attn.store.rows_used if attn.store is not None else 0)
    out["stats"] = attn.stats()
    if attn._cache is not None:
        c = attn._cache
        out["cache"] = (c.now, int(c.now_t), sorted(c._index.items()),
                        [t.cpu().clone() for t in (c.slot_of, c.owner, c.stamp, c.seen, c.reuse)])
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key == "cache":
            assert x[:3] == y[:3]
            for t, u in zip(x[3], y[3]):
                assert torch.equal(t, u), f"page cache state changed ({key})"
        elif isinstance(x, tuple) and len(x) == 6:
            n, where, toks, rows, summ, off = x
            assert (n, where, rows, off) == y[:2] + (y[3], y[5]), f"request {key} changed"
            for (k1, v1), (k2, v2) in zip(toks, y[2]):
                assert torch.equal(k1, k2) and torch.equal(v1, v2), f"request {key}: KV changed"
            assert (summ is None) == (y[4] is None)
            if summ is not None:
                for name in summ:
                    assert torch.equal(summ[name], y[4][name]), f"request {key}: summary changed"
        else:
            assert x == y, f"{key}: {x} != {y}"


class Boom(RuntimeError):
    """The injected failure."""


def fail_on_call(monkeypatch, obj, name: str, n: int):
    """Make `obj.name` raise Boom on its n-th call (1-based) from now on; the others pass through."""
    real = getattr(obj, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"{name} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)
    return calls


def fail_in_gpu_attention(monkeypatch, attn, layer: int) -> None:
    """Make layer `layer`'s GPU attention raise Boom: the eager call (`_gpu.attend`), or the replay
    of the CUDA graph holding it (the "layer" part of dense / gpu, the "back" part after the front
    of host placements)."""
    attend, replay = attn._gpu.attend, attn._replay

    def eager(*args, **kwargs):
        if attn._step is not None and attn._step.next_layer == layer:
            raise Boom(f"GPU attention of layer {layer}")
        return attend(*args, **kwargs)

    def graphed(graphs, at, part, *args, **kwargs):
        if graphs is not None and at == layer and part in ("layer", "back"):
            raise Boom(f"graph replay of layer {layer} ({part})")
        return replay(graphs, at, part, *args, **kwargs)

    monkeypatch.setattr(attn._gpu, "attend", eager)
    monkeypatch.setattr(attn, "_replay", graphed)


def qkv(attn, B, gen):
    return tuple(torch.randn(B, h, D, generator=gen).to(attn.device) for h in (HQ, HKV, HKV))


# ---- extend_request / add_request ------------------------------------------------------------
@pytest.mark.parametrize("placement", HOST)
def test_extend_request_that_runs_out_of_host_pages_leaves_the_request_as_it_was(placement):
    """The issue's case: a chunk larger than the host store's free pages (SGLang's chunked prefill
    goes through this); the request keeps its length and decodes exactly afterwards."""
    attn = HybridAttention(make(placement).cfg, L, HQ, HKV, D, device_pages=64 + 4, host_pages=24)
    shadow = Shadow(attn, 1)
    rid, other = shadow.add(3 * P + 1), shadow.add(2 * P)
    before = state(attn)
    k = shadow.rand(L, 30 * P, HKV, D)
    with pytest.raises(OutOfPagesError, match="needs .* host pages"):
        attn.extend_request(rid, k.to(attn.device), k.to(attn.device))
    assert_same(state(attn), before)
    for _ in range(P + 1):
        assert shadow.step([rid, other]) < 1e-5
    attn.close()


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("where", ["write", "offload", "summary"])
def test_extend_request_failing_mid_chunk_leaves_the_request_as_it_was(monkeypatch, placement,
                                                                         where):
    """A failure injected in the middle of a chunk (a layer's write, an offload, a summary): the
    request is exactly as before (its partly filled page writable again), and decodes exactly."""
    attn = HybridAttention(make(placement).cfg, L, HQ, HKV, D,
                           device_pages=12 if placement in HOST else 64, host_pages=256)
    shadow = Shadow(attn, 2)
    rid, other = shadow.add(2 * P + 2), shadow.add(P + 3)
    assert shadow.step([rid, other]) < 1e-5
    before = state(attn)
    target = {"write": (attn.kv, "write", 2), "offload": (attn.kv, "offload", 2),
              "summary": (attn.store, "compute_rows", 2)}[where]
    if target[0] is None or (where == "offload" and placement not in HOST):
        pytest.skip(f"{placement} has no {where} step")
    fail_on_call(monkeypatch, *target)
    k = shadow.rand(L, 20 * P + 1, HKV, D)         # streams in chunks through the device pool
    with pytest.raises(Boom):
        attn.extend_request(rid, k.to(attn.device), k.to(attn.device))
    monkeypatch.undo()
    assert_same(state(attn), before)
    for _ in range(P + 1):
        assert shadow.step([rid, other]) < 1e-5
    attn.close()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_add_request_that_fails_adds_nothing(monkeypatch, placement):
    attn = HybridAttention(make(placement).cfg, L, HQ, HKV, D, device_pages=12, host_pages=24)
    shadow = Shadow(attn, 3)
    rid = shadow.add(2 * P + 1)
    before = state(attn)
    big = shadow.rand(L, 40 * P, HKV, D)
    with pytest.raises(OutOfPagesError, match="pages"):
        attn.add_request(big.to(attn.device), big.to(attn.device))
    assert_same(state(attn), before)
    fail_on_call(monkeypatch, attn.kv, "write", 2)          # the second layer of a chunk
    k = shadow.rand(L, 5 * P, HKV, D)
    with pytest.raises(Boom):
        attn.add_request(k.to(attn.device), k.to(attn.device))
    monkeypatch.undo()
    assert_same(state(attn), before)
    assert attn.kv.request_ids == [rid] and attn._offloaded.keys() <= {rid}
    assert shadow.step([rid]) < 1e-5
    attn.close()


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_prefill_is_refused_naming_where(placement, bad):
    attn = make(placement)
    k = torch.randn(L, 9, HKV, D)
    k[1, 6, 1, 3] = float(bad)
    before = state(attn)
    with pytest.raises(ValueError, match="k holds NaN or inf \\(first at layer 1, token 6, KV "
                                         "head 1\\)"):
        attn.add_request(k.to(attn.device), torch.randn(L, 9, HKV, D).to(attn.device))
    assert_same(state(attn), before)
    attn.close()


# ---- plan --------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("where", ["build_plan", "extend", "offload", "launch_order"])
def test_a_failed_plan_changes_nothing_and_repeated_failures_grow_nothing(monkeypatch, placement,
                                                                          where):
    """The issue's case: three failed plans grew a request from 11 to 14 tokens."""
    attn = make(placement)
    shadow = Shadow(attn, 4)
    rids = [shadow.add(2 * P - 1), shadow.add(3 * P)]
    assert shadow.step(rids) < 1e-5            # the first request's last page is now full
    before = state(attn)
    for _ in range(3):
        if where == "build_plan":
            monkeypatch.setattr(ha, "build_plan", lambda *a, **k: (_ for _ in ()).throw(Boom()))
        elif where == "extend":
            fail_on_call(monkeypatch, attn.kv, "extend", 2)
        elif where == "offload":
            if placement not in HOST:
                pytest.skip(f"{placement} offloads nothing")
            fail_on_call(monkeypatch, attn.kv, "offload", 1)
        else:
            monkeypatch.setattr(attn, "_launch_order", lambda: (_ for _ in ()).throw(Boom()))
        with pytest.raises(Boom):
            attn.plan(rids)
        monkeypatch.undo()
        assert_same(state(attn), before)
    for _ in range(P + 1):
        assert shadow.step(rids) < 1e-5
    attn.close()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_plan_beyond_the_pools_is_refused_before_any_change(placement):
    """Device pages for the new tokens (dense, gpu) and host pages for the offloads of pages the
    last step filled (host placements) are counted before anything changes."""
    host = placement in HOST
    slots = 2 if placement in ("offload", "hybrid") else 0
    attn = HybridAttention(make(placement, slots=slots or 4).cfg, L, HQ, HKV, D,
                           device_pages=8 + slots if host else 4, host_pages=3 if host else 0)
    shadow = Shadow(attn, 5)
    if host:                                  # 1 host page each, then both fill their 2nd page
        rids = [shadow.add(2 * P - 1), shadow.add(2 * P - 1)]
        assert shadow.step(rids) < 1e-5
        match = "offloads 2 full pages but 1 of 3 host pages are free"
    else:                                     # 1 + 1 + 2 pages of 4: none free
        rids = [shadow.add(P), shadow.add(P), shadow.add(2 * P)]
        match = "new tokens start 2 pages but 0 of 4 device pages are free"
    before = state(attn)
    with pytest.raises(OutOfPagesError, match=match):
        attn.plan(rids[:2])
    assert_same(state(attn), before)
    shadow.remove(rids[-1])
    assert shadow.step(rids[:1]) < 1e-5
    attn.close()


def test_plan_of_no_request_is_an_error_not_a_crash_later():
    attn = make("hybrid")
    with pytest.raises(ValueError, match="plan\\(\\[\\]\\): a step needs at least one request"):
        attn.plan([])
    with pytest.raises(ValueError, match="run\\(\\) needs a plan"):
        attn.run(0, *qkv(attn, 1, torch.Generator().manual_seed(0)))
    attn.close()


# ---- run ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("fail_layer", [0, 1])
def test_a_failed_run_undoes_the_whole_step(monkeypatch, placement, fail_layer):
    """A failure in layer 0 or 1 (the CPU part in host placements, the GPU attention elsewhere):
    lengths, pages, summaries, counters and the page cache are as before plan(); the next steps
    equal the reference."""
    attn = make(placement, slots=3)
    shadow = Shadow(attn, 6)
    rids = [shadow.add(4 * P - 1), shadow.add(5 * P + 2)]
    for _ in range(2):
        assert shadow.step(rids) < 1e-5
    before = state(attn)
    gen = torch.Generator().manual_seed(9)
    attn.plan(rids)
    if placement in ("cpu", "hybrid"):
        fail_on_call(monkeypatch, attn, "_cpu_attend", fail_layer + 1)
    else:                       # the GPU attention: eager, or its CUDA graph's replay
        fail_in_gpu_attention(monkeypatch, attn, fail_layer)
    for layer in range(fail_layer):
        attn.run(layer, *qkv(attn, 2, gen))
    with pytest.raises(Boom):
        attn.run(fail_layer, *qkv(attn, 2, gen))
    monkeypatch.undo()
    after = state(attn)
    if attn._cache is not None:                 # slots fetched into by the failed step are free
        c_before, c_after = before.pop("cache"), after.pop("cache")
        assert c_before[:3] == c_after[:3]
        owner_b, owner_a = c_before[3][1], c_after[3][1]
        kept = (owner_a >= 0).all(-1)
        assert torch.equal(owner_a[kept], owner_b[kept])
        assert torch.equal(c_after[3][3], c_before[3][3]) and torch.equal(c_after[3][4],
                                                                          c_before[3][4])
    assert_same(after, before)
    with pytest.raises(ValueError, match="run\\(\\) needs a plan"):
        attn.run(fail_layer, *qkv(attn, 2, gen))
    for _ in range(P + 1):
        assert shadow.step(rids) < 1e-5
    attn.close()


def test_bad_run_input_changes_nothing_and_the_step_goes_on():
    attn = make("hybrid")
    shadow = Shadow(attn, 7)
    rid = shadow.add(3 * P)
    attn.plan([rid])
    gen = torch.Generator().manual_seed(1)
    q, kn, vn = qkv(attn, 1, gen)
    with pytest.raises(ValueError, match="q must be a float tensor"):
        attn.run(0, q[:, :1], kn, vn)
    assert attn._step is not None and attn._step.next_layer == 0
    for layer in range(L):
        attn.run(layer, q, kn, vn)
    assert attn.kv.seq_len(rid) == 3 * P + 1
    attn.close()


# ---- isolation --------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_requests_cannot_change_between_plan_and_the_last_run(placement):
    """The issue's case: plan([r]), extend_request(r) filling r's tail page, add_request(victim),
    run(0) wrote r's token into the victim's page. Now the changes are refused with one line until
    the step ends or is cancelled; another request may still be removed."""
    attn = make(placement)
    shadow = Shadow(attn, 8)
    r, gone = shadow.add(2 * P + 1), shadow.add(P)
    k = torch.randn(L, P, HKV, D).to(attn.device)
    attn.plan([r])
    before = state(attn)
    for call in (lambda: attn.extend_request(r, k, k), lambda: attn.add_request(k, k),
                 lambda: attn.remove_request(r)):
        with pytest.raises(ValueError, match="step is planned|in the current step"):
            call()
        assert_same(state(attn), before)
    shadow.remove(gone)                           # not in the step: allowed
    attn.cancel_step()
    assert attn.kv.seq_len(r) == 2 * P + 1
    attn.extend_request(r, k, k)
    shadow.kv[r] = tuple(torch.cat([t, k.cpu()], 1) for t in shadow.kv[r])
    victim = shadow.add(3 * P)
    attn.plan([r, victim])
    gen = torch.Generator().manual_seed(2)
    attn.run(0, *qkv(attn, 2, gen))
    with pytest.raises(ValueError, match="step is running \\(layer 1 of 2 is next\\)"):
        attn.add_request(k, k)
    attn.cancel_step()
    for _ in range(P + 1):
        assert shadow.step([r, victim]) < 1e-5
    attn.close()


def test_a_step_writes_only_pages_its_requests_own():
    """Ownership is checked where the step's write targets are fixed (plan)."""
    attn = make("gpu")
    rid = attn.add_request(torch.randn(L, 3, HKV, D).to(attn.device),
                           torch.randn(L, 3, HKV, D).to(attn.device))
    page = attn.kv.residency(rid)[0][0]
    attn.kv.device_alloc._owner[page] = rid + 100          # a corrupted table: not rid's page
    with pytest.raises(PageOwnershipError, match=f"request {rid} addressed page {page}"):
        attn.plan([rid])
    attn.kv.device_alloc._owner[page] = rid
    assert attn.kv.seq_len(rid) == 3
    attn.close()


def test_unknown_request_is_a_value_error_naming_the_id():
    attn = make("cpu")
    for call in (lambda: attn.remove_request(41), lambda: attn.plan([41]),
                 lambda: attn.extend_request(41, torch.zeros(L, 1, HKV, D),
                                             torch.zeros(L, 1, HKV, D))):
        with pytest.raises(UnknownRequestError, match="unknown request id 41") as err:
            call()
        assert isinstance(err.value, ValueError)
    attn.close()


def test_host_placements_refuse_requests_beyond_their_tail_pages_at_add_request():
    """Each request keeps its partly filled page on the device: more requests than tail pages
    are refused when added (naming the sizes), never at a later plan(); the others decode on."""
    cfg = make("cpu").cfg
    attn = HybridAttention(cfg, L, HQ, HKV, D, device_pages=6, host_pages=256)
    shadow = Shadow(attn, 9)
    rids = [shadow.add(P + 1) for _ in range(attn.max_requests)]
    with pytest.raises(OutOfPagesError, match=f"at most {attn.max_requests} requests"):
        shadow.add(3)
    for _ in range(P + 1):
        assert shadow.step(rids) < 1e-5
    attn.close()


# ---- non-finite decode values -------------------------------------------------------------------
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_non_finite_step_kv_is_reported_naming_the_request(placement, caplog):
    attn = make(placement)
    shadow = Shadow(attn, 10)
    good, bad = shadow.add(2 * P + 1), shadow.add(3 * P)
    assert shadow.step([good, bad]) < 1e-5
    assert attn.stats()["last_step"]["nonfinite_requests"] == []
    gen = torch.Generator().manual_seed(3)
    attn.plan([good, bad])
    with caplog.at_level(logging.WARNING, logger=ha.__name__):
        for layer in range(L):
            q, kn, vn = qkv(attn, 2, gen)
            if layer == 1:
                vn[1, 0, 2] = float("inf")
            o = attn.run(layer, q, kn, vn)
            assert torch.isfinite(o[0]).all()
    assert attn.stats()["last_step"]["nonfinite_requests"] == [bad]
    assert attn.stats()["totals"]["nonfinite_requests"] == [bad]
    assert any(f"requests [{bad}]" in r.getMessage() for r in caplog.records)
    attn.close()
