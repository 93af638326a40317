"""Development only: candidate GPU kernels for lowbit page scoring, each checked against a float64
torch formula (at B <= 2) or the shipped kernel and timed (CUDA-graph medians) beside the shipped
kernel (`gpu_kernels.page_scoring`) in one run. Not part of the package. The candidates measured
so far, and the one shipped, are in docs/BENCHMARKS.md ("lowbit's GPU indexer one page at a
time"); their code is in this file's history (commit d635456).

    python3 scripts/dev/lowbit_variants.py [--smoke]
"""
from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from vortex_hybrid.packed_codes import pack_codes  # noqa: E402


@triton.jit
def _dot3(a, b_hi, b_mid, b_lo, acc, INTERP: tl.constexpr):
    """acc + a @ (b_hi + b_mid + b_lo): bfloat16 tensor-core dots (float32 accumulation); a and
    the pieces are bfloat16-exact values (the interpreter's bfloat16 dot is wrong: float32 there,
    the same products)."""
    if INTERP:
        acc = tl.dot(a, b_hi.to(tl.float32), acc, input_precision="ieee")
        acc = tl.dot(a, b_mid.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b_lo.to(tl.float32), acc, input_precision="ieee")
    a16 = a.to(tl.bfloat16)
    acc = tl.dot(a16, b_hi, acc)
    acc = tl.dot(a16, b_mid, acc)
    return tl.dot(a16, b_lo, acc)


@triton.jit
def _dot2(a, b_hi, b_mid, acc, INTERP: tl.constexpr):
    """acc + a @ (b_hi + b_mid): `_dot3` with two bfloat16 pieces (one tensor-core dot fewer)."""
    if INTERP:
        acc = tl.dot(a, b_hi.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b_mid.to(tl.float32), acc, input_precision="ieee")
    a16 = a.to(tl.bfloat16)
    acc = tl.dot(a16, b_hi, acc)
    return tl.dot(a16, b_mid, acc)


@triton.jit
def _split3(b):
    """b float32 as three bfloat16 pieces whose sum is b to about 2**-21 relative."""
    hi = b.to(tl.bfloat16)
    r = b - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _masked_bits(cw_row, bit_stride, c, i, rmask, BITS: tl.constexpr):
    """A [rows, 32] float32: sum_b (word_b & (1 << i)) * 2**b as floats (c * 2**i exactly, the
    sign flipped at i = 31): no shift, no compare per element."""
    m = (i * 0 + 1) << i                                           # int32; 1 << 31 is -2**31
    a = tl.zeros([cw_row.shape[0], 32], tl.float32)
    for bit in tl.static_range(BITS):
        w = tl.load(cw_row + bit * bit_stride + c, mask=rmask, other=0)
        a += (w[:, None] & m[None, :]).to(tl.float32) * (2.0 ** bit)
    return a


@triton.jit
def _selected_bits(cw_row, bit_stride, c, i, rmask, BITS: tl.constexpr):
    """A [rows, 32] float32: sum_b 2**b where bit i of word_b is set (the codes exactly): a
    compare and a select per element and plane instead of an int-to-float conversion."""
    m = (i * 0 + 1) << i                                           # int32; 1 << 31 is -2**31
    a = tl.zeros([cw_row.shape[0], 32], tl.float32)
    for bit in tl.static_range(BITS):
        w = tl.load(cw_row + bit * bit_stride + c, mask=rmask, other=0)
        a += tl.where((w[:, None] & m[None, :]) != 0, 2.0 ** bit, 0.0)
    return a


@triton.jit
def _trick_kernel(q_ptr, hi_ptr, lo_ptr, cw_ptr, table_ptr, lens_ptr, scores_ptr, H,
                  stride_qb, stride_qh, stride_sn, stride_sh, stride_cn, stride_ch, stride_tb,
                  stride_ob, stride_oh, G: tl.constexpr, BITS: tl.constexpr, PS: tl.constexpr,
                  W4: tl.constexpr, CHUNKS: tl.constexpr, GP: tl.constexpr, NP: tl.constexpr,
                  PPB: tl.constexpr, INTERP: tl.constexpr, SELECT: tl.constexpr,
                  PIECES: tl.constexpr):
    """NP pages per dot: rows M = NP * PS (page, token), columns NP * GP (page, query head); A the
    codes times 2**i exactly (`_masked_bits`), B = q * step / float(1 << i) per (page, head)
    column split in three bfloat16 pieces; the diagonal (page == page) blocks kept. SELECT: A the
    codes themselves (`_selected_bits`) and B = q * step, no 2**-i."""
    LEVELS: tl.constexpr = 2 ** BITS - 1
    M: tl.constexpr = NP * PS
    N: tl.constexpr = NP * GP
    row = tl.program_id(0)
    b = row // H
    h = row % H
    seq_len = tl.load(lens_ptr + b)
    n = tl.cdiv(seq_len, PS)
    n_full = seq_len // PS
    q_row = q_ptr + b.to(tl.int64) * stride_qb + (h * G) * stride_qh
    table_row = table_ptr + b.to(tl.int64) * stride_tb
    out = scores_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    r = tl.arange(0, M)
    rp = r // PS
    t = r % PS
    col = tl.arange(0, N)
    cp = col // GP
    cj = col % GP
    i = tl.arange(0, 32)
    inv = 1.0 / ((i * 0 + 1) << i).to(tl.float32)                      # 2**-i, -2**-31 at 31
    pl = tl.arange(0, NP)
    for k in range(PPB // NP):
        p_first = (tl.program_id(1) * PPB) + k * NP
        vr = (p_first + rp) < n_full
        phys_r = tl.load(table_row + p_first + rp, mask=vr, other=0).to(tl.int64)
        cw_row = cw_ptr + phys_r * stride_cn + h * stride_ch + t * (BITS * W4)
        vc = (p_first + cp) < n_full
        phys_c = tl.load(table_row + p_first + cp, mask=vc, other=0).to(tl.int64)
        acc = tl.zeros([M, N], tl.float32)
        base = tl.zeros([N], tl.float32)
        for c in tl.static_range(CHUNKS):
            d = c * 32 + i
            if SELECT:
                a = _selected_bits(cw_row, W4, c, i, vr, BITS)
            else:
                a = _masked_bits(cw_row, W4, c, i, vr, BITS)
            srow = phys_c[None, :] * stride_sn + h * stride_sh + d[:, None]          # [32, N]
            kmax = tl.load(hi_ptr + srow, mask=vc[None, :], other=0.0).to(tl.float32)
            kmin = tl.load(lo_ptr + srow, mask=vc[None, :], other=0.0).to(tl.float32)
            qc = tl.load(q_row + cj[None, :] * stride_qh + d[:, None],
                         mask=(cj[None, :] < G), other=0.0).to(tl.float32)           # [32, N]
            if SELECT:
                bmat = qc * (kmax - kmin) * (1.0 / LEVELS)
            else:
                bmat = qc * (kmax - kmin) * (inv / LEVELS)[:, None]
            b_hi, b_mid, b_lo = _split3(bmat)
            if PIECES == 2:                     # hi + (mid + lo) rounded: about 2**-16 relative
                b_mid = (b_mid.to(tl.float32) + b_lo.to(tl.float32)).to(tl.bfloat16)
            acc = _dot3(a, b_hi, b_mid, b_lo, acc, INTERP) if PIECES == 3 else \
                _dot2(a, b_hi, b_mid, acc, INTERP)
            base += tl.sum(qc * kmin, axis=0)
        diag = (rp[:, None] == cp[None, :]) & (t < PS)[:, None]
        colbest = tl.max(tl.where(diag, acc, float("-inf")), axis=0) + base           # [N]
        colbest = tl.where(cj < G, colbest, float("-inf"))
        best = tl.max(tl.reshape(colbest, [NP, GP]), axis=1)                           # [NP]
        p_offs = p_first + pl
        tl.store(out + p_offs, tl.where(p_offs < n_full, best, 0.0), mask=p_offs < n)


def launch(kind, q, hi, lo, codes, table, lens, ps, bits, **kw):
    B, hq, D = q.shape
    hkv = hi.shape[1]
    G = hq // hkv
    mp = table.shape[1]
    cw = codes.view(torch.int32)
    W4 = D // 32
    scores = torch.empty(B, hkv, mp, dtype=torch.float32, device=q.device)
    common = (q, hi, lo, cw, table, lens, scores, hkv, q.stride(0), q.stride(1), hi.stride(0),
              hi.stride(1), cw.stride(0), cw.stride(1), table.stride(0), scores.stride(0),
              scores.stride(1))
    GP = max(16, triton.next_power_of_2(G))
    if kind == "trick":
        npg, ppb = kw.get("np", 4), kw.get("ppb", 32)
        gp = triton.next_power_of_2(G) if npg > 1 else GP
        while npg * gp < 16:
            gp *= 2
        _trick_kernel[(B * hkv, triton.cdiv(mp, ppb))](
            *common, G=G, BITS=bits, PS=ps, W4=W4, CHUNKS=D // 32, GP=gp, NP=npg, PPB=ppb,
            INTERP=SMOKE, SELECT=kw.get("select", False), PIECES=kw.get("pieces", 3),
            num_warps=kw.get("warps", 4))
    return scores


def formula(q, hi, lo, codes_unpacked, table, lens, ps, bits):
    """float64: max_j (q_j . kmin + max_t q_j . (c_t * step)) over full pages; 0 elsewhere."""
    B, hq, D = q.shape
    hkv = hi.shape[1]
    G = hq // hkv
    out = torch.zeros(B, hkv, table.shape[1], dtype=torch.float64)
    for bi in range(B):
        nf = int(lens[bi]) // ps
        phys = table[bi, :nf].long().cpu()
        kmax = hi[phys, :, 0].double().cpu()                  # [nf, hkv, D]
        kmin = lo[phys, :, 0].double().cpu()
        c = codes_unpacked[phys].double().cpu()             # [nf, hkv, ps, D]
        khat = kmin[:, :, None] + c * ((kmax - kmin) / (2 ** bits - 1))[:, :, None]
        qq = q[bi].double().cpu().view(hkv, G, D)
        s = torch.einsum("phtd,hgd->phgt", khat, qq).amax(dim=(2, 3))   # [nf, hkv]
        out[bi, :, :nf] = s.T
    return out


def main():
    dev = "cpu" if SMOKE else "cuda"
    torch.manual_seed(0)
    if SMOKE:
        B, ctx, hkv, G, D, ps, bits = 2, 16 * 40 + 5, 2, 4, 64, 16, 2
    else:
        B, ctx, hkv, G, D, ps, bits = int(os.environ.get("B", 13)), 32768, 8, 4, 128, 16, 2
    pages = -(-ctx // ps)
    R = B * pages + 3
    perm = torch.randperm(R)[:B * pages].view(B, pages).to(torch.int32)
    table = perm.to(dev)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(B, hkv * G, D, device=dev, dtype=torch.bfloat16)
    lo = (torch.randn(R, hkv, 1, D, device=dev) - 1).to(torch.bfloat16)
    hi = (lo.float() + torch.rand(R, hkv, 1, D, device=dev) * 2).to(torch.bfloat16)
    cu = torch.randint(0, 2 ** bits, (R, hkv, ps, D), dtype=torch.uint8, device=dev)
    codes = pack_codes(cu, bits).contiguous()
    cases = [("trick 1 page w1", "trick", dict(np=1, warps=1)),
             ("trick 4 pages w2", "trick", dict(np=4, warps=2)),
             ("trick 4 pages w4", "trick", dict(np=4, warps=4)),
             ("trick 8 pages w4", "trick", dict(np=8, warps=4)),
             ("select 1 page w1", "trick", dict(np=1, warps=1, select=True)),
             ("select 4 pages w2", "trick", dict(np=4, warps=2, select=True)),
             ("select 4 pages w4", "trick", dict(np=4, warps=4, select=True)),
             ("select 1 page w1, 2 pieces", "trick", dict(np=1, warps=1, select=True, pieces=2)),
             ("select 4 pages w2, 2 pieces", "trick", dict(np=4, warps=2, select=True, pieces=2))]
    want = formula(q, hi, lo, cu, table, lens, ps, bits) if (SMOKE or B <= 2) else None
    old = None
    if not SMOKE:
        from vortex_hybrid.gpu_kernels.page_scoring import launch_page_scores
        old = launch_page_scores(q, hi, lo, table, lens, ps, False, codes=codes)
        t_old = triton.testing.do_bench_cudagraph(
            lambda: launch_page_scores(q, hi, lo, table, lens, ps, False, codes=codes), rep=100,
            return_mode="median")
        print(f"shipped kernel: {t_old * 1e3:9.1f} us  (B={B} ctx={ctx})", flush=True)
        if want is not None:
            err = (old.double().cpu() - want).abs().max().item()
            print(f"  shipped vs float64 max abs err {err:.3g}")
    byts = B * pages * hkv * (ps * bits * D // 8 + 2 * D * 2)
    for name, kind, kw in cases:
        try:
            got = launch(kind, q, hi, lo, codes, table, lens, ps, bits, **kw)
            ref = want if want is not None else old.double().cpu()
            err = (got.double().cpu() - ref).abs().max().item()
            rel = err / ref.abs().max().item()
            if SMOKE:
                print(f"{name:24s} max abs err {err:.3g} rel {rel:.3g}")
                continue
            ms = triton.testing.do_bench_cudagraph(
                lambda: launch(kind, q, hi, lo, codes, table, lens, ps, bits, **kw), rep=100,
                return_mode="median")
            print(f"{name:24s} {ms * 1e3:9.1f} us  {byts / ms / 1e6:7.0f} GB/s  max abs err vs "
                  f"main {err:.3g} (rel {rel:.2g})", flush=True)
        except Exception as e:  # a variant that fails to compile is reported, the others go on
            print(f"{name:24s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
