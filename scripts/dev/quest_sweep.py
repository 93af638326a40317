"""Development only: launch choices of quest's page-scoring kernel (`gpu_kernels.page_scoring.
_page_scores_kernel`: pages per program BLOCK_P, num_warps) at Llama-3-8B heads, 13 x 32K, with
bfloat16 and float8 summaries; each checked equal to the shipped launch and timed (CUDA-graph
medians) beside it, with the device-to-device copy bandwidth of the same run as the ceiling.
The shipped launch reaches about half of HBM bandwidth (docs/BENCHMARKS.md, gpu_topk); a better
choice here would go into `launch_page_scores`. Not part of the package.

    python3 scripts/dev/quest_sweep.py            # a CUDA machine, ~1 minute
"""
from __future__ import annotations

import os

import torch
import triton

from vortex_hybrid.gpu_kernels.page_scoring import (BLOCK_PAGES, _page_scores_kernel,
                                                    launch_page_scores)


def main() -> None:
    torch.manual_seed(0)
    B, ctx, hkv, G, D, ps = int(os.environ.get("B", 13)), 32768, 8, 4, 128, 16
    pages = ctx // ps
    R = B * pages
    table = torch.randperm(R, device="cuda").view(B, pages).to(torch.int32)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(B, hkv * G, D, device="cuda", dtype=torch.bfloat16)
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    copy_ms = triton.testing.do_bench_cudagraph(lambda: x.clone(), rep=50, return_mode="median")
    copy_bw = 2 * x.numel() / copy_ms / 1e6                                   # GB/s, read + write
    print(f"device copy: {copy_bw:.0f} GB/s (read + write); B={B} ctx={ctx} pages={pages}")
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        lo = (torch.randn(R, hkv, 1, D, device="cuda") - 1).to(dtype)
        hi = (lo.float() + torch.rand(R, hkv, 1, D, device="cuda") * 2).to(dtype)
        byts = R * hkv * 2 * D * hi.element_size()
        want = launch_page_scores(q, hi, lo, table, lens, ps, True)
        ms = triton.testing.do_bench_cudagraph(
            lambda: launch_page_scores(q, hi, lo, table, lens, ps, True), rep=100,
            return_mode="median")
        print(f"{str(dtype):22s} shipped (BLOCK_P {BLOCK_PAGES}, 4 warps): {ms * 1e3:7.1f} us "
              f"{byts / ms / 1e6:6.0f} GB/s ({byts / ms / 1e6 / copy_bw:.0%} of the copy)")
        for block_p in (16, 32, 64, 128):
            for warps in (2, 4, 8):
                out = torch.empty_like(want)

                def run():
                    _page_scores_kernel[(B * hkv, triton.cdiv(pages, block_p))](
                        q, hi, lo, table, lens, out, hkv, ps, D, q.stride(0), q.stride(1),
                        hi.stride(0), hi.stride(1), table.stride(0), out.stride(0),
                        out.stride(1), G=G, QUEST=True, BLOCK_P=block_p, BLOCK_D=D,
                        num_warps=warps)
                try:
                    run()
                    same = torch.equal(out, want)
                    ms = triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median")
                    print(f"{'':22s} BLOCK_P {block_p:3d}, {warps} warps: {ms * 1e3:7.1f} us "
                          f"{byts / ms / 1e6:6.0f} GB/s ({byts / ms / 1e6 / copy_bw:.0%})"
                          f"{'' if same else '  DIFFERS from the shipped launch'}", flush=True)
                except Exception as e:  # a choice that does not compile is reported
                    print(f"{'':22s} BLOCK_P {block_p}, {warps} warps: FAILED {type(e).__name__}")


if __name__ == "__main__":
    main()
