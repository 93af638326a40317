"""`lowbit` served: packed codes (`vortex_hybrid.packed_codes`), the fused cache and indexer kernels
of both backends (Triton under its interpreter on a CPU machine, Numba) against the reference
interpreter and the float64 formula of test_vflow_lowbit.py, the runtime with flow "lowbit", and
the summary bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vortex_hybrid import HybridAttention, HybridConfig, vflow
from vortex_hybrid.packed_codes import pack_codes, packed_width, unpack_codes
from vortex_hybrid.vflow.flows import LowBit
from vortex_hybrid.vflow.interpreter import indexer_scores, run_cache
from vortex_hybrid.vflow.select import new_summaries
from vortex_hybrid.vflow.summary_store import summary_bytes

from test_hybrid_attention import Shadow, make, reference_output
from test_vflow_gqa import combined
from test_vflow_lowbit import head_scores
from test_vflow_select import assert_selection, make_inputs, tolerance

BACKENDS = ["cpu", "gpu"]
SEEDS = [0, 1, 2]
FP8 = torch.float8_e4m3fn


def kernels(backend: str):
    if backend == "cpu":
        from vortex_hybrid.cpu_kernels import lowerings
    else:
        from vortex_hybrid.gpu_kernels import lowerings
    return lowerings


def device_of(backend: str) -> torch.device:
    """Where a backend's kernels take their tensors: the GPU backend's on CUDA when there is one
    (natively), else on the CPU (Triton's interpreter)."""
    return torch.device("cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu")


def on(device: torch.device, tensors: dict) -> dict:
    return {k: v.to(device) for k, v in tensors.items()}


def stores(compiled, n: int, hkv: int, dtype: torch.dtype,
           device: torch.device = torch.device("cpu")) -> dict[str, torch.Tensor]:
    return new_summaries(compiled.summaries, n, hkv, dtype, device, compiled.codes)


# ---- packed codes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_codes_round_trip_in_bits_bits_a_value(seed, bits):
    gen = torch.Generator().manual_seed(seed)
    for c in (1, 7, 8, 13, 64):
        codes = torch.randint(0, 2 ** bits, (3, 4, c), generator=gen)
        packed = pack_codes(codes.float(), bits)
        assert packed.dtype == torch.uint8 and packed.shape[-1] == packed_width(c, bits)
        assert packed_width(c, bits) == bits * -(-c // 8)
        assert torch.equal(unpack_codes(packed, bits, c), codes.to(torch.int32))
        # the layout: plane b is numpy's little-endian packbits of bit b of every code
        planes = [np.packbits(((codes.numpy() >> b) & 1).astype(np.uint8), axis=-1,
                              bitorder="little") for b in range(bits)]
        np.testing.assert_array_equal(packed.numpy(), np.concatenate(planes, -1))


def test_pack_rounds_to_the_nearest_code_and_clamps():
    got = unpack_codes(pack_codes(torch.tensor([[-2.0, 0.4, 0.6, 2.2, 3.0, 9.0]]), 2), 2, 6)
    assert got.tolist() == [[0, 0, 1, 2, 3, 3]]


# ---- the fused cache stage ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_cache_writes_the_reference_summaries(backend, dtype, bits, seed):
    """The packed codes equal the reference interpreter's bit for bit (codes from the float32
    bounds, before they are rounded to the store's dtype), and so do kmin, kmax (but a bf16 store
    under Triton's interpreter: within one bf16 step); head_dim 12 is not a
    multiple of 8 (a partial last byte in each plane); rows differ from pages."""
    gen = torch.Generator().manual_seed(seed)
    k_pool = (torch.randn(6, 3, 4, 12, generator=gen) * 3).to(
        torch.bfloat16 if seed == 2 else torch.float32)
    compiled = LowBit(bits=bits).compiled(4, 12, 1)
    pages, rows = torch.tensor([0, 2, 5, 3]), torch.tensor([3, 0, 1, 4])
    dev = device_of(backend)
    want, got = stores(compiled, 5, 3, dtype), stores(compiled, 5, 3, dtype, dev)
    run_cache(compiled, k_pool, pages, want, rows)
    kernels(backend).lowbit_cache(k_pool.to(dev), pages.to(dev), got, rows.to(dev))
    got = on(torch.device("cpu"), got)
    assert torch.equal(got["codes"], want["codes"])
    for name in ("kmin", "kmax"):
        if backend == "gpu" and dtype == torch.bfloat16:    # Triton's interpreter casts to bf16
            torch.testing.assert_close(got[name], want[name], rtol=2 ** -7, atol=0)  # by truncation
        else:
            assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name
    # and the codes are the float64 formula's wherever t is not within float32 rounding of a half
    keys = k_pool[pages].double()
    lo, hi = keys.amin(2, keepdim=True), keys.amax(2, keepdim=True)
    t = (keys - lo) / (hi - lo).clamp_min(1e-20) * (2 ** bits - 1)
    formula = sum((t >= level - 0.5).int() for level in range(1, 2 ** bits))
    codes = unpack_codes(got["codes"][rows], bits, 12)
    clear = ((t - t.round()).abs() - 0.5).abs() > 1e-5
    assert torch.equal(codes[clear], formula[clear])


@pytest.mark.parametrize("backend", BACKENDS)
def test_halves_round_up_in_the_fused_cache(backend):
    """Keys at exactly k + 1/2 steps of a channel's range code up: range [0, 3] in 2 bits (step 1):
    0.5 -> 1, 1.5 -> 2, 2.5 -> 3; just below a half codes down."""
    below = float(np.nextafter(np.float32(0.5), np.float32(0)))
    col = torch.tensor([0.0, 3.0, 0.5, 1.5, 2.5, below, 1.0, 2.0])
    k_pool = col.reshape(1, 1, 8, 1).expand(1, 1, 8, 8).contiguous()
    compiled = vflow.load_flow("lowbit").compiled(8, 8, 1)
    dev = device_of(backend)
    got = stores(compiled, 1, 1, torch.float32, dev)
    kernels(backend).lowbit_cache(k_pool.to(dev), torch.tensor([0], device=dev), got)
    got = on(torch.device("cpu"), got)
    codes = unpack_codes(got["codes"], 2, 8)[0, 0, :, 0]
    assert codes.tolist() == [0, 3, 1, 2, 3, 0, 1, 2]


# ---- the fused indexer ----------------------------------------------------------------------------
def fused_selection(backend, q, k_pool, table, lens, budget, sink, recent, budgets=None):
    P, D = k_pool.shape[2], k_pool.shape[3]
    compiled = vflow.load_flow("lowbit").compiled(P, D, q.shape[1] // k_pool.shape[1])
    dev = device_of(backend)
    s = stores(compiled, k_pool.shape[0], k_pool.shape[1], torch.float32, dev)
    kern = kernels(backend)
    kern.lowbit_cache(k_pool.to(dev), torch.arange(k_pool.shape[0], device=dev), s)
    extra = {} if budgets is None else {"budgets": budgets.to(dev)}
    sel = kern.lowbit_indexer(q.to(dev), s, table.to(dev), lens.to(dev), budget, sink, recent,
                              page_size=P, **extra)
    return sel.cpu(), on(torch.device("cpu"), s)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_indexer_selects_like_the_float64_formula(backend, seed):
    """Groups 1/3/4, pages of 4, partial last pages, unused table columns -1, budgets from
    sink + recent to more than all pages; float32 may swap pages only within rounding of the
    selection boundary."""
    rng = np.random.default_rng(seed)
    group, D, P, max_pages = int(rng.choice([1, 3, 4])), 16, 4, 11
    q, k_pool, table, lens = make_inputs(300 + seed, torch.float32, 3, 2, group, D, P, max_pages)
    want = combined(head_scores(2, q, k_pool, table, lens), "max", D ** -0.5)
    for budget, sink, recent in ((3, 1, 2), (5, 1, 1), (7, 0, 2), (13, 1, 2)):
        sel, _ = fused_selection(backend, q, k_pool, table, lens, budget, sink, recent)
        assert_selection(sel, want, lens, P, budget, sink, recent, tolerance(torch.float32, want))
        got = sel[sel >= 0].reshape(-1)
        assert all(bool((row[row >= 0].diff() > 0).all()) for row in sel.reshape(-1, budget))
        assert got.numel() > 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_scores_equal_the_reference_up_to_float32_rounding(backend, seed):
    q, k_pool, table, lens = make_inputs(400 + seed, torch.float32, 2, 2, 3, 16, 4, 9)
    _, s = fused_selection(backend, q, k_pool, table, lens, 3, 1, 2)
    if backend == "cpu":
        from vortex_hybrid.cpu_kernels.page_scoring import launch_page_scores
    else:
        from vortex_hybrid.gpu_kernels.page_scoring import launch_page_scores
    d = on(device_of(backend), dict(q=q, table=table, lens=lens, **s))
    got = launch_page_scores(d["q"], d["kmax"], d["kmin"], d["table"], d["lens"], 4, True,
                             codes=d["codes"]).cpu()
    compiled = vflow.load_flow("lowbit").compiled(4, 16, 3)
    ref = indexer_scores(compiled, q.double(), s, table, lens, 2)[0][0]   # float64, same codes
    formula = combined(head_scores(2, q, k_pool, table, lens), "max", 0.25)
    full = torch.arange(9)[None, :] < (lens // 4)[:, None]
    for b in range(2):
        for h in range(2):
            m = full[b]
            np.testing.assert_allclose(got[b, h, m].numpy(), ref[b, h, m].numpy(), rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_allclose(got[b, h, m].numpy(), formula[b, h, m.numpy()],
                                       rtol=1e-4, atol=1e-4)


def lowbit_formula(q, s, table, lens, bits, P) -> np.ndarray:
    """float64 [B, Hkv, max_pages]: max over the KV head's query heads j and a full page's tokens t
    of q_j . (kmin + c_t (kmax - kmin) / L), L = 2**bits - 1, from the store's bounds and codes as
    stored (q as given, in float64); -inf for the partial tail page and past the request."""
    B, hq, D = q.shape
    hkv = s["kmin"].shape[1]
    out = np.full((B, hkv, table.shape[1]), -np.inf)
    for b in range(B):
        qg = q[b].double().reshape(hkv, hq // hkv, D)
        for p in range(int(lens[b]) // P):
            row = int(table[b, p])
            lo, hi = s["kmin"][row, :, 0].double(), s["kmax"][row, :, 0].double()   # [Hkv, D]
            c = unpack_codes(s["codes"][row], bits, D).double()                   # [Hkv, P, D]
            keys = lo[:, None] + c * ((hi - lo) / (2 ** bits - 1))[:, None]
            out[b, :, p] = torch.einsum("hgd,htd->hgt", qg, keys).amax((1, 2)).numpy()
    return out


# (head_dim, page_size, group, summary dtype): the served shape; head_dim not a multiple of 8 (a
# partial last byte in each plane); a page of one token and odd page sizes (flows take powers of
# two, the kernel any size: it takes tokens two at a time); groups below, above and between
# multiples of 4 (it takes query heads four at a time)
SCORE_SHAPES = [(128, 16, 4, torch.bfloat16), (12, 3, 3, torch.float32), (20, 1, 5, FP8),
                (24, 5, 5, FP8), (40, 8, 8, torch.float32), (9, 2, 1, torch.bfloat16)]


def score_cases(bits, D, P, group, dtype):
    """q, table, lens and two stores of the same shape: the pages' key ranges in the store's dtype
    with the keys' codes on them, then random bounds and random code bytes (every code value, a
    range even for pages of one token, and padding bits past head_dim set, which must not
    count)."""
    q, k_pool, table, lens = make_inputs(700 + bits * 10 + D, torch.float32, 2, 2, group, D, P, 7)
    lo, hi = k_pool.amin(2, keepdim=True), k_pool.amax(2, keepdim=True)
    levels = 2 ** bits - 1
    coded = {"kmin": lo.to(dtype), "kmax": hi.to(dtype),
             "codes": pack_codes((k_pool - lo) / (hi - lo).clamp_min(1e-20) * levels, bits)}
    gen = torch.Generator().manual_seed(bits * 100 + D)
    lo = torch.randn(lo.shape, generator=gen)
    rand = {"kmin": lo.to(dtype), "kmax": (lo + torch.rand(lo.shape, generator=gen) * 3).to(dtype),
            "codes": torch.randint(0, 256, coded["codes"].shape, dtype=torch.uint8,
                                   generator=gen)}
    return q, table, lens, (coded, rand)


@pytest.mark.parametrize("D,P,group,dtype", SCORE_SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_cpu_scores_equal_the_float64_formula_for_every_code_width(bits, D, P, group, dtype):
    """The CPU kernel's scores (its bits=2 path and the general one, up to packed_codes' widest
    codes) against the float64 formula over the same stored bounds and codes (`score_cases`)."""
    from vortex_hybrid.cpu_kernels.page_scoring import launch_page_scores
    q, table, lens, cases = score_cases(bits, D, P, group, dtype)
    for s in cases:
        got = launch_page_scores(q, s["kmax"], s["kmin"], table, lens, P, True, codes=s["codes"])
        want = lowbit_formula(q, s, table, lens, bits, P)
        scale = float(np.abs(want[np.isfinite(want)]).max())
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5 * (scale + 1))


# (head_dim, page_size, group, summary dtype, block_pages) of the GPU kernel, which takes one
# page at a time through tensor-core dots over chunks of 32 channels (`page_scoring.lowbit_config`):
# the served shape (4 chunks, int32 code words); head_dims whose planes are a multiple of 4 bytes
# (int32 words: 64, 96) and ones that are not (4 byte loads a word, masked bytes and channels in
# the last chunk: 12, 20, 36, 40, 72); pages of one token and page sizes not a power of two
# (tokens padded to 16 rows); a page past 128 tokens (256 rows, 4 warps); block_pages that do not
# divide the pages (programs ending past the last page); groups 1, 3, 5, 8 (query heads padded to
# 16 columns)
GPU_SCORE_SHAPES = [(128, 16, 4, torch.bfloat16, 32), (12, 3, 3, torch.float32, 32),
                    (40, 1, 5, FP8, 32), (72, 5, 8, torch.float32, 2),
                    (20, 1, 1, torch.bfloat16, 1), (36, 130, 3, torch.float32, 4),
                    (64, 7, 3, FP8, 3), (96, 16, 8, torch.float32, 5)]


@pytest.mark.parametrize("D,P,group,dtype,block_pages", GPU_SCORE_SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_gpu_scores_equal_the_float64_formula_for_every_code_width(bits, D, P, group, dtype,
                                                                   block_pages):
    """The GPU kernel's scores against the float64 formula over the same stored bounds and codes
    (`score_cases`) on every full page; the partly filled tail page scores 0."""
    from vortex_hybrid.gpu_kernels.page_scoring import launch_page_scores
    dev = device_of("gpu")
    q, table, lens, cases = score_cases(bits, D, P, group, dtype)
    for s in cases:
        d = on(dev, dict(q=q, table=table, lens=lens, **s))
        got = launch_page_scores(d["q"], d["kmax"], d["kmin"], d["table"], d["lens"], P, True,
                                 block_pages, codes=d["codes"]).cpu().numpy()
        want = lowbit_formula(q, s, table, lens, bits, P)
        full = np.isfinite(want)
        scale = float(np.abs(want[full]).max())
        np.testing.assert_allclose(got[full], want[full], rtol=1e-5, atol=1e-5 * (scale + 1))
        for b in range(len(lens)):
            if int(lens[b]) % P:
                assert (got[b, :, int(lens[b]) // P] == 0).all()


def test_gpu_lowbit_launch_choices_fit_the_tensor_core_dots():
    """Every page size gives dots of BLOCK_T rows, a power of two of at least 16 and the page's
    tokens; GP columns a power of two of at least 16 and the group; one warp up to 64 rows."""
    from vortex_hybrid.gpu_kernels.page_scoring import lowbit_config
    for P in (*range(1, 40), 64, 65, 100, 128, 129, 200, 256):
        for group in (1, 3, 4, 8, 16, 17):
            cfg = lowbit_config(P, group)
            t = cfg["BLOCK_T"]
            assert t >= max(16, P) and t & (t - 1) == 0 and t < 2 * max(16, P)
            assert cfg["GP"] >= max(16, group) and cfg["GP"] & (cfg["GP"] - 1) == 0
            assert cfg["num_warps"] == (1 if t <= 64 else t // 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_indexer_takes_per_row_budgets(backend):
    """budgets= [B, Hkv]: each row is exactly the selection of a call at its own budget."""
    q, k_pool, table, lens = make_inputs(9, torch.float32, 3, 2, 4, 16, 4, 11)
    budgets = torch.tensor([[3, 7], [5, 4], [7, 3]], dtype=torch.int32)
    sel, _ = fused_selection(backend, q, k_pool, table, lens, 7, 1, 2, budgets)
    for b in range(3):
        for h in range(2):
            one, _ = fused_selection(backend, q, k_pool, table, lens, int(budgets[b, h]), 1, 2)
            row = sel[b, h]
            assert row[row >= 0].tolist() == one[b, h][one[b, h] >= 0].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_code_stores_are_rejected_by_name(backend):
    dev = device_of(backend)
    q, k_pool, table, lens = (t.to(dev) for t in make_inputs(1, torch.float32, 1, 2, 2, 16, 4, 5))
    compiled = vflow.load_flow("lowbit").compiled(4, 16, 2)
    s = stores(compiled, k_pool.shape[0], 2, torch.float32, dev)
    kern = kernels(backend)
    for bad in (s["codes"].float(), s["codes"][..., :3], s["codes"][:, :, :2]):
        with pytest.raises(ValueError, match=r"summaries\['codes'\].*expected packed codes"):
            kern.lowbit_cache(k_pool, torch.arange(k_pool.shape[0], device=dev),
                              {**s, "codes": bad})
        with pytest.raises(ValueError, match=r"summaries\['codes'\].*expected packed codes"):
            kern.lowbit_indexer(q, {**s, "codes": bad}, table, lens, 3, 1, 2, page_size=4)


# ---- the lowering hook and the runtime -------------------------------------------------------------
def test_the_library_lowbit_binds_its_kernels_and_other_options_interpret():
    for device in ("cpu", "cuda"):
        bound = vflow.bind_flow("lowbit", 16, 64, 4, device)
        assert bound.cache_kernel.__name__ == "lowbit_cache"
        assert bound.indexer_kernel.__name__ == "lowbit_indexer" and bound.takes_budgets
        assert vflow.bind_flow(LowBit(bits=3), 16, 64, 4, device).indexer_kernel is None
        assert vflow.bind_flow(LowBit(gqa="sum"), 16, 64, 4, device).indexer_kernel is None
        assert vflow.bind_flow("quest", 16, 64, 4, device).cache_kernel.__name__ == "quest_cache"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("placement", ["gpu", "hybrid"])
def test_runtime_with_lowbit_returns_the_reference_and_captures_selection(placement, seed):
    """The runtime's fused lowbit (summaries kept packed in its store) gives the float64 reference
    attention over the reference interpreter's selection while pages fill, are summarised and (in
    hybrid) offloaded and cached."""
    attn = make(placement, flow="lowbit")
    assert attn.selection_captures
    assert attn.store.bound.indexer_kernel is not None
    assert attn.store.layer(0)["codes"].dtype == torch.uint8

    def select(cfg, q, kp, table, lens, n):
        return vflow.select_pages(cfg.flow, q, kp, table, lens, cfg.budget_for(n),
                                  cfg.sink_pages, cfg.recent_pages, lower=False)

    shadow = Shadow(attn, 50 + seed)
    rids = [shadow.add(29 + seed), shadow.add(14)]
    for _ in range(6):
        err = shadow.step(rids, reference=lambda cfg, q, k, v: reference_output(cfg, q, k, v,
                                                                                 select))
        assert err < 1e-5, f"{placement}: relative error {err:.2e}"
    attn.close()


def test_lowbit_summaries_take_a_quarter_of_the_bf16_keys():
    """2 bits, page 16, head_dim 128: 512 bytes of codes + kmin, kmax (256 bytes each in bfloat16)
    = 1024 bytes per page and KV head against 4096 bytes of bf16 keys: exactly 1/4 (3/8 with
    float32 bounds, 5/16 with float8 ones); quest's kmin/kmax in bf16 take 512."""
    key_bytes = 16 * 128 * 2
    assert summary_bytes("lowbit", 1, 1, 1, 16, 128, torch.bfloat16) == 1024 == key_bytes // 4
    assert summary_bytes("lowbit", 1, 1, 1, 16, 128, torch.float32) == 1536
    assert summary_bytes("lowbit", 1, 1, 1, 16, 128, FP8) == 768
    assert summary_bytes("quest", 1, 1, 1, 16, 128, torch.bfloat16) == 512
    assert summary_bytes("lowbit", 2, 3, 4, 16, 128, torch.bfloat16) == 2 * 3 * 4 * 1024


def test_code_declarations_are_checked_and_part_of_the_lowering_match():
    """Codes(r, c, bits) with bits outside 1-8 is a FlowError naming it; a flow computing lowbit's
    graphs but keeping its codes as float summaries is not served by lowbit's kernels (they write
    and read the packed layout): the code widths are part of the structure lowerings match."""
    class Wide(LowBit):
        def create_cache(self, page_size, head_dim):
            return {**super().create_cache(page_size, head_dim),
                    "codes": vflow.Codes(page_size, head_dim, 9)}

    with pytest.raises(vflow.FlowError, match=r"summary 'codes' declares Codes with bits=9"):
        Wide().compiled(4, 8, 1)

    class FloatCodes(LowBit):
        def create_cache(self, page_size, head_dim):
            return {**super().create_cache(page_size, head_dim), "codes": (page_size, head_dim)}

    for device in ("cpu", "cuda"):
        bound = vflow.bind_flow(FloatCodes(), 16, 64, 4, device)
        assert bound.cache_kernel is None and bound.indexer_kernel is None
    q, k_pool, table, lens = make_inputs(5, torch.float32, 2, 2, 2, 8, 4, 6)
    assert torch.equal(vflow.select_pages(FloatCodes(), q, k_pool, table, lens, 4, 1, 2),
                       vflow.select_pages("lowbit", q, k_pool, table, lens, 4, 1, 2, lower=False))
