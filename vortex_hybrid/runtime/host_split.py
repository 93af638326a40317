"""Which host-resident selected pages the GPU fetches and which the CPU attends where they are.

A page missing from the GPU page cache can be attended by the CPU (it reads only the KV heads that
selected it: `heads / Hkv` of the page's bytes, from host DRAM) or copied over PCIe into a cache slot
(all heads, once, then attended on the GPU and possibly reused next step). Both draw on host DRAM at
the same time, so their rates are the *concurrent* ones (docs/hardware.md: CPU attention ~21 GB/s
while a copy runs, the copy ~54 GB/s). `choose_fetches` takes pages by how many heads selected them
(a fetch pays off most for pages many heads read) and stops when the copy would finish after the
CPU's remaining work: the two then end together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HostCosts:
    """Bandwidths in bytes/s while both host consumers run."""

    h2d_bw_concurrent: float
    cpu_attn_bw_concurrent: float

    @classmethod
    def defaults(cls, device: torch.device) -> "HostCosts":
        """The H100 machine's measured concurrent figures (docs/hardware.md)."""
        return cls(h2d_bw_concurrent=54e9, cpu_attn_bw_concurrent=21e9)


def choose_fetches(costs: HostCosts, misses: dict[int, list[int]], heads: dict[tuple[int, int], int],
                   num_kv_heads: int, page_size: int, head_dim: int, elem_bytes: int
                   ) -> dict[int, list[int]]:
    """The subset of `misses` (per request, host pages not in the GPU cache) to fetch, given
    heads[(rid, page)] = how many KV heads selected the page; the rest is left to the CPU."""
    head_bytes = 2 * page_size * head_dim * elem_bytes             # K and V of one head of a page
    order = sorted(((heads[(rid, p)], rid, p) for rid, ps in misses.items() for p in ps),
                   reverse=True)
    cpu_left = sum(n for n, _, _ in order) * head_bytes / costs.cpu_attn_bw_concurrent
    copy = 0.0
    out: dict[int, list[int]] = {rid: [] for rid in misses}
    for n, rid, p in order:
        copy_next = copy + num_kv_heads * head_bytes / costs.h2d_bw_concurrent
        cpu_next = cpu_left - n * head_bytes / costs.cpu_attn_bw_concurrent
        if copy_next > cpu_next and copy_next > cpu_left:
            break
        copy, cpu_left = copy_next, cpu_next
        out[rid].append(p)
    return out
