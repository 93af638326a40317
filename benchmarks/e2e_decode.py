"""Question: end to end, how many decode tokens/s does a Llama-3-8B-shaped model reach with its KV in
HBM (`dense`: full attention, the baseline; `gpu`: sparse) against KV in pinned host memory
(`offload`, `cpu`, `hybrid`) at the largest batch each can hold, and what is hybrid / dense?

Model: a minimal Llama decoder written here (RMSNorm, fused QKV projection, RoPE with theta 500000
and no Llama-3 frequency scaling, o_proj, SwiGLU MLP, final norm, lm_head, greedy argmax fed back
each step), **random weights** (normal, std 0.02, norms 1; fixed --seed, printed): right for speed,
meaningless as text. Default shape Llama-3-8B: 32 layers, hidden 4096, 32 q / 8 KV heads, head_dim
128, intermediate 14336, vocab 128256, bf16 (8.03 B parameters, 16.06 GB). --layers shrinks it.

CUDA graphs (--graphs): `whole` (default) makes each step one CUDA graph per batch shape: the
step is planned with `plan(rids, whole_step=True)` outside it, the model's layers and every
`HybridAttention.run` inside it (the host placements' CPU hand-off too, by the runtime's flag
protocol), and `finish_step()` after the replay; a shape's first step runs eagerly (kernels
compile), its second is captured, later ones replay. `layers`: one replay for the embedding and
layer 0's norm + QKV + RoPE, then per layer `HybridAttention.run` (its own per-layer graphs) and
one replay per layer boundary. --fuse compiles the model's per-layer math with torch.compile (on
with CUDA). Without CUDA the same functions run eagerly (the --smoke configuration, CI).

Micro-batches (--micro-batches N, host placements in whole steps): the batch runs as N contiguous
micro-batches, one runtime of 1/N of the memory each (`runtime.micro_batches.MicroBatches`: their
CPU parts on one hand-off worker), the step staggered by a layer (`whole_micro`): while the GPU
runs one micro-batch's layer, the CPU attends another's. The model's weights are then read N
times a step. The tokens equal one batch's (tested).

Prompt KV: synthetic (normal K of std 1, V = K; per request from a generator seeded by --seed and
the request's index, so request i holds the same KV in every mode), appended with `add_request`;
prefill is **not measured**. Every request holds --context tokens after the last step (the prompt is
--context minus the steps). Attention: flow --flow at --budget of the pages (sink 1, recent 2 pages).

Selections (--locality): `flow`, the flow's own choice on the random model (the worst case: no
locality, reuse ~0 between steps); `real`, a synthetic stream (`hybrid_step.SelStream`, drawn before
the timed steps) with --reuse (0.8: what real models reuse step to step) of each (request, KV head)'s
non-forced pages kept from the step before, attended exactly through `run(..., sel=)` (dense keeps
full attention); the flow's indexer still runs on every layer (`index_given`) and its choice is
dropped, so these steps pay what selecting costs.

Memory (the runtime's memory model, `runtime.memory_model`): every mode gets the same HBM for KV,
--gpu-memory-gib (default: the free HBM after the weights, less the largest synthetic prompt tensor
and --hbm-reserve-gib for activations, graphs and workspaces). Batches (the largest that fits, unless
--batch says otherwise; a --batch that does not fit exits 2):
- `dense`, `gpu`: every page of every layer in that HBM; `gpu` also holds the flow's summaries.
- `offload`, `cpu`, `hybrid`: full pages in pinned host memory (pinned at its exact size), 90% of
  psutil's available memory less --host-reserve-gib, and at most the tail pages' request count; the
  HBM holds the tail pages, the summaries (on the host when they do not fit) and, in `offload` and
  `hybrid`, every other page as GPU cache slots (--cache overrides with a share of the batch's pages).
Dense at the host placements' batch cannot be measured (its KV does not fit in HBM): the ratio to
dense is tokens/s against dense at its own (largest) batch.

Timing: --warmup steps, then --steps steps, each synchronised at its end (a server reads the step's
tokens); medians of wall time per step. tokens/s = batch / median step time. Per mode also: KV bytes
attended per token (page-heads from the runtime's counters), the step's lower bound from the bytes
it moved (weights / HBM bandwidth + `hybrid_step.lower_bound` of the attention bytes; ceilings from
`cost_model.measure(quick=True)`) and the share of it reached, cache hit rate, the share of the step
the driving thread waited for the CPU worker (per-layer graphs only: inside a whole-step graph the
GPU waits, not the thread; the JSON then gives `cpu_part_ms`, the worker's time in the CPU parts),
and plan()'s host time (`plan_ms`), and the OS threads that used CPU time during the timed steps
(`busy_threads`: CPU seconds over wall seconds, from /proc; --cpu-replay adds the NUMA nodes of the
host pool and the threads busy during its calls). --profile adds a profiled step's kernels by GPU
time and its timeline. Goal reported, not asserted: hybrid / dense >= 3.5x
(the mark Vortex reports over full attention); the JSON also gives the ratio hybrid would reach at
its own lower bound, which shows whether any schedule could meet it on this machine.

    python benchmarks/e2e_decode.py --out results                        # GPU machine, ~4-6 min
    python benchmarks/e2e_decode.py --modes dense,gpu,hybrid --out results   # or in two calls:
    python benchmarks/e2e_decode.py --modes cpu,offload --out results2       # if one overruns
    python benchmarks/e2e_decode.py --smoke --out /tmp/e2e               # any machine, seconds
    python benchmarks/e2e_decode.py --gpu-memory-gib 12 --locality real  # the HBM-limited row

Writes e2e_decode.json (after every mode) and e2e_decode.md (the table) under --out; the table is
printed last. Modes run one at a time in one process (dense, gpu, hybrid, cpu, offload), each freed
(device memory and pinned blocks) before the next; --time-limit skips a mode the last one says
would overrun.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numba
import numpy as np
import psutil
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hybrid_step import HEAD_PAGE_BYTES, SelStream, fmt, lower_bound, release_memory, table  # noqa: E402

from vortex_hybrid import HybridAttention, HybridConfig  # noqa: E402
from vortex_hybrid.config import SUMMARY_DTYPES  # noqa: E402
from vortex_hybrid.kv.page_pool import GIB, pool_bytes  # noqa: E402
from vortex_hybrid.runtime.memory_model import HOST_PLACEMENTS, HOST_SHARE, TAIL_PAGES  # noqa: E402
from vortex_hybrid.runtime.micro_batches import MicroBatches  # noqa: E402
from vortex_hybrid.scheduler import cost_model  # noqa: E402
from vortex_hybrid.vflow.summary_store import summary_bytes  # noqa: E402

MODES = ("dense", "gpu", "hybrid", "cpu", "offload")          # the order they run in
SINK, RECENT, GOAL = 1, 2, 3.5


@dataclass(frozen=True)
class Shape:
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    inter: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0
    eps: float = 1e-5


SMOKE = dict(shape=Shape(2, 64, 4, 2, 16, 128, 256), context=320, batch="2", steps=3, warmup=1,
             dtype="float32", page_size=16, modes="dense,gpu,hybrid", cache=0.1)


class Decoder:
    """Llama decoder weights (random, fixed seed) on one device; `bytes_per_step` is what one decode
    step reads of them (every matrix but the embedding table, of which it reads B rows)."""

    def __init__(self, s: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed)

        def w(*size):
            return torch.randn(*size, generator=g, device=device, dtype=dtype).mul_(0.02)

        self.s, self.dtype, self.device = s, dtype, device
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.embed = w(s.vocab, s.hidden)
        self.wqkv = [w(qkv, s.hidden) for _ in range(s.layers)]
        self.wo = [w(s.hidden, s.heads * s.head_dim) for _ in range(s.layers)]
        self.wgu = [w(2 * s.inter, s.hidden) for _ in range(s.layers)]
        self.wd = [w(s.hidden, s.inter) for _ in range(s.layers)]
        self.norm1 = [torch.ones(s.hidden, device=device, dtype=dtype) for _ in range(s.layers)]
        self.norm2 = [torch.ones(s.hidden, device=device, dtype=dtype) for _ in range(s.layers)]
        self.norm_f = torch.ones(s.hidden, device=device, dtype=dtype)
        self.lm_head = w(s.vocab, s.hidden)
        self.inv_freq = 1.0 / s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=device,
                                                            dtype=torch.float32) / s.head_dim)
        mats = self.wqkv + self.wo + self.wgu + self.wd + [self.lm_head]
        self.bytes_per_step = sum(t.numel() * t.element_size() for t in mats)
        self.params = sum(t.numel() for t in mats) + self.embed.numel()


class DecodeStep:
    """Static buffers of one batch and the step's non-attention work around `HybridAttention.run`:
    `pre()` (embed ids, layer 0's norm + QKV + RoPE into q, k, v) and `boundary(i)` (o_proj of
    attn_out + residual + MLP of layer i, then layer i+1's q, k, v; after the last layer the logits,
    the argmax into ids and pos + 1). With CUDA both are CUDA graphs (`capture`)."""

    def __init__(self, m: Decoder, batch: int) -> None:
        s, dev, dt = m.s, m.device, m.dtype
        self.m, self.B = m, batch
        self.ids = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.h = torch.zeros(batch, s.hidden, dtype=torch.float32, device=dev)   # the residual
        self.q = torch.zeros(batch, s.heads, s.head_dim, dtype=dt, device=dev)
        self.k = torch.zeros(batch, s.kv_heads, s.head_dim, dtype=dt, device=dev)
        self.v = torch.zeros_like(self.k)
        self.attn_out = torch.zeros_like(self.q)
        self.logits = torch.zeros(batch, s.vocab, dtype=torch.float32, device=dev)
        self.graphs = None
        self.pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        self.whole_graphs: dict = {}          # the runtime's whole-step key -> the step's graph
        self.seen: set = set()                # keys that ran once eagerly (compiled, warm)
        self.sel: Optional[torch.Tensor] = None   # [L, B, Hkv, K]: the step's given selection
        self.plan_s: list = []                # host seconds of each step's plan()
        self.defer = False                    # whole steps end with finish_step(wait=False)
        self.prev_stats: Optional[dict] = None   # then: the step before's counters (plan() ends it)
        self.qkv_fn, self.mlp_fn = self._qkv_math, self._mlp_math     # `fuse` compiles them

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.m.s.eps)).to(w.dtype) * w

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x.float()
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), -1)
        return x * cos + rot * sin

    def _qkv_math(self, h, norm_w, wqkv, pos, inv_freq):
        s, B = self.m.s, self.B
        qkv = F.linear(self._norm(h, norm_w), wqkv)
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                             s.kv_heads * s.head_dim], -1)
        freqs = pos[:, None].float() * inv_freq                            # [B, D/2]
        emb = torch.cat((freqs, freqs), -1)[:, None]                       # [B, 1, D]
        cos, sin = emb.cos(), emb.sin()
        return (self._rope(q.view(B, s.heads, s.head_dim), cos, sin),
                self._rope(k.view(B, s.kv_heads, s.head_dim), cos, sin),
                v.view(B, s.kv_heads, s.head_dim))

    def _mlp_math(self, h, attn_out, wo, norm2, wgu, wd):
        h = h + F.linear(attn_out.flatten(1), wo)
        gate, up = F.linear(self._norm(h, norm2), wgu).chunk(2, -1)
        return h + F.linear(F.silu(gate) * up, wd)

    def fuse(self) -> None:
        """Compile the per-layer math with torch.compile (its elementwise ops fused, as a serving
        engine's fused norm / RoPE / activation kernels are); the same for every mode."""
        self.qkv_fn = torch.compile(self._qkv_math, fullgraph=True)
        self.mlp_fn = torch.compile(self._mlp_math, fullgraph=True)

    def _qkv(self, layer: int) -> None:
        m = self.m
        q, k, v = self.qkv_fn(self.h, m.norm1[layer], m.wqkv[layer], self.pos, m.inv_freq)
        self.q.copy_(q)
        self.k.copy_(k)
        self.v.copy_(v)

    def _pre(self) -> None:
        self.h.copy_(self.m.embed.index_select(0, self.ids))
        self._qkv(0)

    def _boundary(self, layer: int) -> None:
        m = self.m
        self.h.copy_(self.mlp_fn(self.h, self.attn_out, m.wo[layer], m.norm2[layer],
                                 m.wgu[layer], m.wd[layer]))
        if layer + 1 < m.s.layers:
            self._qkv(layer + 1)
        else:
            self.logits.copy_(F.linear(self._norm(self.h, m.norm_f), m.lm_head))
            self.ids.copy_(self.logits.argmax(-1))
            self.pos.add_(1)

    def capture(self) -> None:
        """One CUDA graph for pre() and one per boundary, in one memory pool (they replay in turn).
        Warm-up runs change the buffers: call `start` after."""
        fns = [self._pre] + [lambda i=i: self._boundary(i) for i in range(self.m.s.layers)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in fns:
                fn()
        torch.cuda.current_stream().wait_stream(side)
        pool, self.graphs = torch.cuda.graph_pool_handle(), []
        gc.collect()        # as layer_graphs does: a collection during capture would free another
        gc.disable()        # runtime's CUDA memory and invalidate the capture
        try:
            for fn in fns:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=side, capture_error_mode="thread_local"):
                    fn()
                self.graphs.append(g)
        finally:
            gc.enable()
        torch.cuda.current_stream().wait_stream(side)

    def whole(self, attn: HybridAttention, key, sel: Optional[torch.Tensor]):
        """The step as one function over the static buffers (pre, then per layer the runtime's
        run() and the boundary): what `capture_whole` records. sel: [L, B, Hkv, K] or None."""
        self._pre()
        for layer in range(self.m.s.layers):
            self.attn_out.copy_(attn.run(layer, self.q, self.k, self.v,
                                         sel=None if sel is None else sel[layer],
                                         check_sel=False))
            self._boundary(layer)

    def capture_whole(self, attn: HybridAttention, key, sel: Optional[torch.Tensor]
                      ) -> "torch.cuda.CUDAGraph":
        """One CUDA graph of the whole step for `key` (the runtime's whole-step key): capturing
        records it without running it, so the caller replays it next."""
        return capture_graph(lambda: self.whole(attn, key, sel), self.pool)

    def start(self, ids: torch.Tensor, pos: torch.Tensor) -> None:
        self.ids.copy_(ids)
        self.pos.copy_(pos)

    def pre(self) -> None:
        self.graphs[0].replay() if self.graphs else self._pre()

    def boundary(self, layer: int) -> None:
        self.graphs[layer + 1].replay() if self.graphs else self._boundary(layer)


def capture_graph(fn, pool) -> "torch.cuda.CUDAGraph":
    """Record `fn` (a whole step) in a new CUDA graph in `pool` without running it; the garbage
    collector is off meanwhile (a collection during capture could free another runtime's CUDA
    memory and invalidate the capture)."""
    g = torch.cuda.CUDAGraph()
    gc.collect()
    gc.disable()
    try:
        with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
            fn()
    finally:
        gc.enable()
    return g


def decode_step(attn: HybridAttention, rids: list, st: DecodeStep, sels=None,
                whole: bool = False) -> str:
    """One decode step of every request: tokens in st.ids become the next tokens in st.ids.
    sels: this step's selection per layer [L, B, Hkv, K] (the `real` locality regime), else the
    flow's. whole: the step planned with whole_step=True: its first run of a key runs eagerly
    (kernels compile), the second captures one graph of the whole step, later ones replay it.
    Returns how the step ran: "replay", "eager" or "layers"."""
    t0 = time.perf_counter()
    if whole:
        key = attn.plan(rids, whole_step=True)      # deferred: this completes the step before
        st.plan_s.append(time.perf_counter() - t0)
        if st.defer:
            st.prev_stats = attn.stats()["last_step"]
        if sels is not None:
            if st.sel is None or st.sel.shape != sels.shape:
                st.sel = torch.empty_like(sels)
            st.sel.copy_(sels)
        g = st.whole_graphs.get(key)
        if g is None and key in st.seen and st.pool is not None:
            g = st.whole_graphs[key] = st.capture_whole(attn, key, st.sel if sels is not None
                                                        else None)
        st.seen.add(key)
        if g is not None:
            g.replay()
        else:
            st.whole(attn, key, st.sel if sels is not None else None)
        attn.finish_step(wait=not st.defer)
        return "replay" if g is not None else "eager"
    attn.plan(rids)
    st.plan_s.append(time.perf_counter() - t0)
    st.pre()
    for layer in range(st.m.s.layers):
        sel = None if sels is None else sels[layer]
        st.attn_out.copy_(attn.run(layer, st.q, st.k, st.v, sel=sel, check_sel=False))
        st.boundary(layer)
    return "layers"


def whole_micro(mb, steps: list, sels: Optional[list]) -> None:
    """A whole step of micro-batches staggered by a layer (`runtime.micro_batches`): each part's
    layer begins (its GPU part up to the wait for the CPU) before the other part's layer ends, so
    the CPU attends one micro-batch while the GPU runs the other's layer. sels: per part
    [L, B_i, Hkv, K] or None."""
    L = steps[0].m.s.layers
    sel = (lambda i, layer: None) if sels is None else (lambda i, layer: sels[i][layer])  # noqa: E731
    for st in steps:
        st._pre()
    pend = [p.run_begin(0, st.q, st.k, st.v, sel=sel(i, 0), check_sel=False)
            for i, (p, st) in enumerate(zip(mb.parts, steps))]
    for layer in range(L):
        for i, (p, st) in enumerate(zip(mb.parts, steps)):
            st.attn_out.copy_(p.run_end(pend[i]))
            st._boundary(layer)
            if layer + 1 < L:
                pend[i] = p.run_begin(layer + 1, st.q, st.k, st.v, sel=sel(i, layer + 1),
                                      check_sel=False)


def decode_step_micro(mb, rids: list, steps: list, graphs: dict, sels=None) -> str:
    """`decode_step` for micro-batches (`whole_micro`): plan every part, then the staggered step
    as one CUDA graph per tuple of the parts' keys (a key's first step eager, its second captured,
    later ones replayed), then finish every part. sels: per part this step's [L, B_i, Hkv, K]."""
    st0 = steps[0]
    t0 = time.perf_counter()
    key = mb.plan(rids)
    st0.plan_s.append(time.perf_counter() - t0)
    static = None
    if sels is not None:
        for st, sel in zip(steps, sels):
            if st.sel is None or st.sel.shape != sel.shape:
                st.sel = torch.empty_like(sel)
            st.sel.copy_(sel)
        static = [st.sel for st in steps]
    g = graphs.get(key)
    if g is None and key in st0.seen and st0.pool is not None:
        g = graphs[key] = capture_graph(lambda: whole_micro(mb, steps, static), st0.pool)
    st0.seen.add(key)
    if g is not None:
        g.replay()
    else:
        whole_micro(mb, steps, static)
    mb.finish_step()
    return "replay" if g is not None else "eager"


@dataclass
class Sizes:
    """Per-request pages and the batches that fit, with what limited them."""
    prefill: int
    pages: int
    dense: int
    gpu: int
    host: int
    hbm_usable: float
    host_usable: float


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def device_need(mode: str, b: int, z: Sizes, s: Shape, args) -> int:
    """Device bytes of `dense`/`gpu` at batch b: the pool (every page) and `gpu`'s summaries."""
    pool = pool_bytes(s.layers, b * (z.pages + 1) + 8, s.kv_heads, args.page_size, s.head_dim,
                      getattr(torch, args.dtype))
    if mode == "gpu":
        pool += summary_bytes(args.flow, s.layers, b * (z.pages + 1), s.kv_heads, args.page_size,
                              s.head_dim, getattr(torch, args.summary_dtype))
    return pool


def host_need(b: int, z: Sizes, s: Shape, args) -> int:
    """Host bytes of a host placement's pool at batch b (pinned at its exact size)."""
    return pool_bytes(s.layers, b * z.pages, s.kv_heads, args.page_size, s.head_dim,
                      getattr(torch, args.dtype))


def size_batches(args, s: Shape, dev: torch.device) -> Sizes:
    prefill = args.context - args.warmup - args.steps
    pages = -(-args.context // args.page_size)
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    prompt = s.layers * prefill * s.kv_heads * s.head_dim * elem     # one request's K (V = K)
    avail = psutil.virtual_memory().available
    host_usable = HOST_SHARE * avail - args.host_reserve_gib * GIB
    if dev.type == "cuda":
        hbm_usable = torch.cuda.mem_get_info(dev)[0] - prompt - args.hbm_reserve_gib * GIB
    else:                          # no HBM: the "device" pool is host memory too
        hbm_usable = host_usable - prompt
    if args.gpu_memory_gib is not None:
        if args.gpu_memory_gib * GIB > hbm_usable:
            fail(f"--gpu-memory-gib={args.gpu_memory_gib} exceeds the {hbm_usable / GIB:.1f} GiB of "
                 "HBM left after the weights, a prompt and --hbm-reserve-gib")
        hbm_usable = args.gpu_memory_gib * GIB
    z = Sizes(prefill, pages, 0, 0, 0, hbm_usable / GIB, host_usable / GIB)
    z.dense = largest(lambda b: device_need("dense", b, z, s, args) <= hbm_usable)
    z.gpu = largest(lambda b: device_need("gpu", b, z, s, args) <= hbm_usable)
    z.host = min(largest(lambda b: host_need(b, z, s, args) <= host_usable), TAIL_PAGES - 1)
    return z


def largest(fits) -> int:
    """The largest batch b >= 1 with fits(b) (monotone), or 0."""
    if not fits(1):
        return 0
    hi = 1
    while fits(2 * hi):
        hi *= 2
    lo, hi = hi, 2 * hi                     # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def parse_batch(text: str, modes: list) -> dict:
    """'N' (every mode) or 'mode=N,...' -> {mode: N}."""
    out = {}
    for part in [p for p in text.split(",") if p]:
        name, _, num = part.rpartition("=")
        targets = modes if not name else [name]
        if name and name not in MODES:
            fail(f"--batch={text!r}: {name!r} is not a mode; modes are {','.join(MODES)}")
        if not num.isdigit() or int(num) < 1:
            fail(f"--batch={text!r}: {num!r} must be a positive integer")
        out.update({t: int(num) for t in targets})
    return out


def choose_batches(args, z: Sizes, s: Shape, modes: list, dev) -> dict:
    """The batch of each mode: the largest that fits, or --batch's if it fits (else exit 2)."""
    largest = {"dense": z.dense, "gpu": z.gpu, **{m: z.host for m in HOST_PLACEMENTS}}
    asked = parse_batch(args.batch, modes) if args.batch else {}
    out = {}
    for mode in modes:
        b = asked.get(mode, largest[mode])
        if mode in asked and b > largest[mode]:
            where = f"{z.host_usable:.1f} GiB of host memory usable" if mode in HOST_PLACEMENTS \
                else f"{z.hbm_usable:.1f} GiB of HBM usable"
            fail(f"--batch {mode}={b} does not fit: {mode} holds at most {largest[mode]} requests of "
                 f"{args.context} tokens in {where}")
        out[mode] = b
    return out


def synthetic_kv(s: Shape, T: int, index: int, args, dev) -> torch.Tensor:
    g = torch.Generator(device=dev).manual_seed(args.seed * 100003 + index)
    return torch.randn(s.layers, T, s.kv_heads, s.head_dim, generator=g, device=dev,
                       dtype=getattr(torch, args.dtype))


def split_batch(batch: int, n: int) -> list:
    """Micro-batch sizes: `batch` requests in `n` contiguous parts, the first ones larger by one."""
    return [batch // n + (i < batch % n) for i in range(n)]


def run_mode(mode: str, batch: int, m: Decoder, z: Sizes, args, costs, dev) -> dict:
    """Build `mode` at `batch`, prefill synthetic KV, warm up, time; the mode's record (with the
    tokens of every step, [steps][batch]). With --micro-batches N (host placements, whole steps):
    N runtimes of 1/N of the memory each, one per contiguous part of the batch, their CPU parts on
    one shared worker (`MicroBatches`), the step staggered by a layer (`whole_micro`)."""
    s, t0 = m.s, time.perf_counter()
    host = mode in HOST_PLACEMENTS
    whole = args.graphs == "whole"
    n_parts = args.micro_batches if host and whole and batch >= args.micro_batches else 1
    sizes = split_batch(batch, n_parts)
    hbm = z.hbm_usable if dev.type == "cuda" else args.gpu_memory_gib
    parts, mb, sels = [], None, None
    try:
        for size in sizes:
            slots = None
            if args.cache is not None and mode in ("offload", "hybrid"):
                slots = max(8, int(args.cache * size * z.pages))
            cfg = HybridConfig(page_size=args.page_size, flow=args.flow, budget_ratio=args.budget,
                               sink_pages=SINK, recent_pages=RECENT, placement=mode,
                               gpu_cache_pages=slots, kv_dtype=args.dtype,
                               summary_dtype=args.summary_dtype, fetch_share=args.fetch_share,
                               fetch_programs=args.fetch_programs,
                               cached_steps=not args.no_cached_steps,
                               compile_cache_step=args.compile_cache_step,
                               gpu_memory_gib=None if hbm is None else hbm / n_parts,
                               cpu_threads=args.cpu_threads,
                               gpu_reserve_gib=0.0)     # the reserve is already out of z.hbm_usable
            parts.append(HybridAttention(
                cfg, s.layers, s.heads, s.kv_heads, s.head_dim,
                device_pages=None if host else size * (z.pages + 1) + 8,
                host_pages=size * z.pages if host else None, device=dev, costs=costs))
        attn = parts[0]
        if n_parts > 1:
            mb = MicroBatches(parts, overlap_back=args.overlap_back)
        rids, steps, first = [], [], 0
        for p, size in zip(parts, sizes):
            part = []
            for i in range(first, first + size):
                k = synthetic_kv(s, z.prefill, i, args, dev)
                part.append(p.add_request(k, k))
                del k
            rids.append(part)
            st = DecodeStep(m, size)
            if args.fuse == "on":
                st.fuse()
            if dev.type == "cuda" and not whole:
                st.capture()
            steps.append(st)
            first += size
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        ids = torch.randint(0, s.vocab, (batch,), generator=g).to(dev)
        for st, lo in zip(steps, np.cumsum([0] + sizes[:-1])):
            st.start(ids[lo:lo + st.B], torch.full((st.B,), z.prefill, dtype=torch.int64, device=dev))
        if args.locality == "real" and mode != "dense":   # drawn before timing; dense: full
            n = [-(-(z.prefill + i + 1) // args.page_size) for i in range(args.warmup + args.steps)]
            K = min(attn.cfg.budget_for(n[0]), n[0])
            stream = SelStream(s.layers, batch, K, args.reuse, args.seed, dev, kv_heads=s.kv_heads)
            sels = [torch.stack([stream.next(layer, n[i]) for layer in range(s.layers)])
                    for i in range(len(n))]
            for part in parts:              # the flow's indexer still runs: its cost is paid
                part.index_given = True
        build_s = time.perf_counter() - t0
        print(f"  {mode}: batch {batch} built in {build_s:.0f} s", flush=True)
        tokens, rec, how, graphs = [], [], [], {}
        bounds = np.cumsum([0] + sizes)
        cpu0 = t_timed = None
        defer = args.defer_finish and whole and mb is None
        steps[0].defer = defer
        ids = []                                # deferred: each step's tokens, read at the end
        for i in range(args.warmup + args.steps):
            if not defer or i == args.warmup:   # deferred: waits only before the timed steps
                attn.complete_step()            # (a no-op unless a step was deferred)
                sync(dev)
            if i == args.warmup:                    # which OS threads ran during the timed steps
                cpu0, t_timed = thread_cpu_s(), time.perf_counter()
            t1 = time.perf_counter()
            if mb is None:
                ran = decode_step(attn, rids[0], steps[0], None if sels is None else sels[i], whole)
            else:
                sel_i = None if sels is None else [sels[i][:, lo:hi].contiguous()
                                                   for lo, hi in zip(bounds[:-1], bounds[1:])]
                ran = decode_step_micro(mb, rids, steps, graphs, sel_i)
            if i < args.warmup:                 # progress: the first steps compile and capture
                sync(dev)
                print(f"  {mode}: warm-up step {i + 1} of {args.warmup} in "
                      f"{time.perf_counter() - t1:.1f} s", flush=True)
            if defer:                           # no sync: the next plan() overlaps this step
                ids.append(torch.cat([st.ids for st in steps]).clone())
                if i > args.warmup:             # the step before, completed by this plan()
                    rec.append((None, steps[0].prev_stats))
                if i >= args.warmup:
                    how.append(ran)
                continue
            sync(dev)
            ms = (time.perf_counter() - t1) * 1e3
            tokens.append([t for st in steps for t in st.ids.tolist()])
            if i >= args.warmup:
                rec.append((ms, attn.stats()["last_step"] if mb is None else mb.stats()))
                how.append(ran)
        if defer:                               # the last step: completed and waited for here
            attn.complete_step()
            sync(dev)
            ms = (time.perf_counter() - t_timed) * 1e3 / args.steps     # the mean step
            rec = [(ms, c) for _, c in rec] + [(ms, attn.stats()["last_step"])]
            tokens = [t.tolist() for t in ids]
            steps[0].defer = False
        busy = busy_threads(cpu0, thread_cpu_s(), time.perf_counter() - t_timed) \
            if cpu0 is not None else []
        print(f"  {mode}: threads busy during the timed steps (CPU s / wall s): "
              + ", ".join(f"{b['thread']} {b['share']:.2f}" for b in busy), flush=True)
        if args.profile and mb is None:
            profile_step(attn, rids[0], steps[0], sels, whole, mode, args)
        replay = cpu_replay(attn, args.cpu_replay) if args.cpu_replay and host and whole else None
        last_logits = torch.cat([st.logits for st in steps])
        memory = dict(hbm_gib=sum(p.memory.device_bytes for p in parts) / GIB,
                      host_gib=sum(p.memory.host_bytes for p in parts) / GIB,
                      gpu_cache_pages=sum(p.memory.gpu_cache_pages for p in parts),
                      summaries_on_device=attn.memory.summary_on_device,
                      graphs=attn._graphs is not None, micro_batches=sizes,
                      step_ran=sorted(set(how)),
                      plan_ms=statistics.median(steps[0].plan_s[args.warmup:]) * 1e3,
                      cpu_attn_bw_live=attn.stats().get("cpu_attn_bw"),
                      cpu_call_s_live=attn.stats().get("cpu_call_s"), cpu_replay=replay,
                      busy_threads=busy)
        head_bytes = 2 * args.page_size * s.head_dim * m.embed.element_size()
        out = dict(mode=mode, batch=batch, build_s=build_s, tokens=tokens, logits=last_logits,
                   locality=args.locality, reuse=stream.measured() if sels is not None else None,
                   **memory, **summarize(rec, m, batch, costs, head_bytes))
        print(f"  {mode}: {out['tokens_per_s']:.1f} tokens/s, {out['ms_per_step']:.2f} ms/step; "
              "releasing the runtime", flush=True)     # a slow release still leaves the figure
    finally:
        t_release = time.perf_counter()
        if mb is not None:
            mb.close()
        else:
            for p in parts:
                p.close()
    out["release_s"] = time.perf_counter() - t_release   # the pools' unpinning, mostly
    print(f"  {mode}: released in {out['release_s']:.1f} s", flush=True)
    return out


def profile_step(attn, rids, st, sels, whole, mode, args) -> None:
    """One more step under torch.profiler (the step's selection is the last timed one's); when
    whole, two unprofiled steps first, so that a new key's eager run and capture (and any
    recompiling) are done and the profiled step is a replay; its kernels by GPU time in
    profile_<mode>.txt, its timeline in profile_<mode>.json.gz."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    attn.complete_step()
    for _ in range(2 if whole else 0):
        decode_step(attn, rids, st, None if sels is None else sels[-1], whole)
    sync(st.m.device)
    with profile(activities=acts) as prof:
        decode_step(attn, rids, st, None if sels is None else sels[-1], whole)
        sync(st.m.device)
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    trace = os.path.join(args.out, f"profile_{mode}.json")
    prof.export_chrome_trace(trace)             # the step's timeline (chrome://tracing, Perfetto)
    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(trace)
    events = prof.key_averages()
    with open(os.path.join(args.out, f"profile_{mode}.txt"), "w") as fh:
        fh.write(f"kernels by GPU time ({key}):\n{events.table(sort_by=key, row_limit=40)}\n")
        fh.write("host time by op (self_cpu_time_total: plan(), launches, finish_step()):\n"
                 f"{events.table(sort_by='self_cpu_time_total', row_limit=30)}\n")


def cpu_replay(attn, reps: int) -> dict:
    """The last timed step's last CPU part (the last layer's q and host selection, still in the
    step's pinned buffers) run again outside the step, `reps` calls per row: from this thread back
    to back and with a 1 ms sleep before each call (the kernels' threads idle between calls, as
    between a step's layers), from a new thread, and per thread count and schedule split into the
    launcher's preparation and its parallel kernel, beside an empty parallel loop's fork and join.
    Set against the step's own calls (cpu_kernel_ms / cpu_calls), it says whether a call's cost in
    the step is the kernel's on these pages, or the step's surroundings (threads, the GPU's copies)."""
    import threading

    import numba

    from vortex_hybrid import cpu_kernels
    from vortex_hybrid.cpu_kernels import threads as kthreads
    static = attn._step.static
    io, s = static.cpu_io, static.step
    layer = attn.num_layers - 1
    pages = int((io["sel"] >= 0).sum())
    k_pool, v_pool = attn.kv.host_pool.k[layer], attn.kv.host_pool.v[layer]

    def calls(gap_s: float = 0.0, schedule: str = "balanced") -> tuple:
        times, parts = [], {}
        for _ in range(reps):
            if gap_s:
                time.sleep(gap_s)
            t0 = time.perf_counter()
            cpu_kernels.launch_sparse_decode_attention(
                io["q"], k_pool, v_pool, s.host_table, s.lens_cpu, io["sel"],
                out=(io["o"], io["lse"]), schedule=schedule, timings=parts)
            times.append(time.perf_counter() - t0)
        return (statistics.median(times) * 1e3, parts.get("prep", 0.0) / reps * 1e3,
                parts.get("kernel", 0.0) / reps * 1e3)

    x = np.zeros(256, np.float64)

    def fork_join() -> float:
        _fork_join(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            _fork_join(x)
        return (time.perf_counter() - t0) / reps * 1e3

    cpu0, t_start = thread_cpu_s(), time.perf_counter()
    out = dict(layer=layer, pages=pages,
               mb=pages * 2 * k_pool.shape[2] * k_pool.shape[3] * k_pool.element_size() / 1e6,
               threading_layer=numba.threading_layer(),
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
               numa_nodes=len([n for n in os.listdir("/sys/devices/system/node")
                               if n.startswith("node")])
               if os.path.isdir("/sys/devices/system/node") else None,
               host_pool_numa=numa_placement(attn.kv.host_pool.k),
               main_ms=calls()[0], main_gap1ms_ms=calls(1e-3)[0])
    out["busy_threads_main"] = busy_threads(cpu0, thread_cpu_s(), time.perf_counter() - t_start)
    box = {}
    th = threading.Thread(target=lambda: box.update(ms=calls()[0], gap_ms=calls(1e-3)[0]))
    th.start()
    th.join()
    out.update(thread_ms=box.get("ms"), thread_gap1ms_ms=box.get("gap_ms"))
    before, rows = kthreads.cpu_threads(), []
    try:
        for n in sorted({n for n in (1, 2, 4, 8, before) if n <= kthreads.max_threads()}):
            kthreads.set_cpu_threads(n)
            numba.set_num_threads(n)
            for schedule in ("balanced", "static"):
                ms, prep, kern = calls(schedule=schedule)
                rows.append(dict(threads=n, schedule=schedule, ms=ms, prep_ms=prep,
                                 kernel_ms=kern, fork_join_ms=fork_join()))
    finally:
        kthreads.set_cpu_threads(before)
    out["by_threads"] = rows
    print(f"cpu replay: NUMA nodes {out['numa_nodes']}, host pool K by node (GiB) "
          f"{out['host_pool_numa']}; threads busy during the main-thread calls: "
          f"{out['busy_threads_main']}", flush=True)
    print(f"cpu replay (layer {layer}, {pages} page-heads, {out['mb']:.2f} MB): " + ", ".join(
        f"{k} {v:.3f}" for k, v in out.items() if isinstance(v, float)), flush=True)
    for r in rows:
        print("cpu replay " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in r.items()), flush=True)
    return out


def numa_placement(t: torch.Tensor) -> Optional[dict]:
    """Linux: the NUMA nodes of a host tensor's memory, {"N0": GiB, ...}: the per-node pages of the
    /proc/self/numa_maps mappings that hold it (the one its first byte lies in and those starting
    inside it; a mapping shared with other data counts whole). None where unreadable."""
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    maps = []
    try:
        with open("/proc/self/numa_maps") as fh:
            for line in fh:
                head, *fields = line.split()
                maps.append((int(head, 16), fields))
    except (OSError, ValueError):
        return None
    maps.sort(key=lambda m: m[0])
    first = max((i for i, (start, _) in enumerate(maps) if start <= lo), default=None)
    chosen = [m for i, m in enumerate(maps) if i == first or lo < m[0] < hi]
    out: dict = {}
    for _, fields in chosen:
        page = 4096
        for f in fields:
            if f.startswith("kernelpagesize_kB="):
                page = int(f.split("=")[1]) * 1024
        for f in fields:
            if f[:1] == "N" and "=" in f and f[1:f.index("=")].isdigit():
                node, n = f.split("=")
                out[node] = out.get(node, 0.0) + int(n) * page / GIB
    return {k: round(v, 3) for k, v in sorted(out.items())} or None


def thread_cpu_s() -> dict:
    """Linux: CPU seconds (user + system) of each OS thread of this process, by "name/tid"."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as fh:
                stat = fh.read()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            rest = stat[stat.rindex(")") + 2:].split()
            out[f"{name}/{tid}"] = (int(rest[11]) + int(rest[12])) / tick
    except (OSError, ValueError, IndexError):
        pass
    return out


def busy_threads(before: dict, after: dict, wall_s: float, top: int = 8) -> list:
    """The threads that ran during a window (CPU seconds over `wall_s`), busiest first."""
    rows = [(k, after[k] - before.get(k, 0.0)) for k in after]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])[:top]
    return [dict(thread=k, cpu_s=round(v, 3), share=round(v / max(wall_s, 1e-9), 2))
            for k, v in rows]


@numba.njit(parallel=True, nogil=True, cache=False)
def _fork_join(x):
    """An empty parallel loop: the fork and join of the CPU kernels' thread team."""
    for i in numba.prange(x.shape[0]):
        x[i] += 1.0


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def summarize(rec: list, m: Decoder, batch: int, costs, head_bytes: int) -> dict:
    """Medians over the timed steps (rec: (ms, the runtime's last_step counters) per step): time,
    tokens/s, bytes, the lower bound and its share. head_bytes: K and V of one page of one KV head."""
    ms = statistics.median(r[0] for r in rec)
    med = lambda key: statistics.median(r[1].get(key, 0) for r in rec)   # noqa: E731
    kv = (med("gpu_pages") + med("cpu_pages")) * head_bytes
    lbs = []
    for _, c in rec:           # hybrid_step.lower_bound counts page-heads of the 8B shape's bytes
        c = dict(c, gpu_pages=c["gpu_pages"] * head_bytes / HEAD_PAGE_BYTES)
        lbs.append(lower_bound(c, costs)[0] + m.bytes_per_step / costs.hbm_bw)
    lb_ms = statistics.median(lbs) * 1e3
    looked = med("cache_hits") + med("cache_misses")
    return dict(ms_per_step=ms, tokens_per_s=batch / ms * 1e3, steps_ms=[r[0] for r in rec],
                kv_bytes_per_token=kv / batch, weight_bytes_per_token=m.bytes_per_step / batch,
                lower_bound_ms=lb_ms, of_lower_bound=lb_ms / ms,
                hit_rate=med("cache_hits") / looked if looked else None,
                cpu_wait_frac=statistics.median(r[1].get("gpu_wait_s", 0) * 1e3 / r[0] for r in rec),
                pcie_bytes_per_step=med("bytes_h2d"), cpu_bytes_per_step=med("bytes_cpu"),
                cpu_part_ms=med("cpu_part_s") * 1e3, cpu_kernel_ms=med("cpu_kernel_s") * 1e3,
                cpu_calls=med("cpu_calls"),
                step_shape=rec[-1][1].get("step_shape"))


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)}")
    ap.add_argument("--context", type=int, default=32768,
                    help="tokens per request after the last step (default 32768)")
    ap.add_argument("--batch", default="", help="'N' for every mode or 'mode=N,...' (default: the "
                    "largest batch each mode holds; one that does not fit exits 2)")
    ap.add_argument("--flow", default="quest", help="selection flow of the sparse modes (quest)")
    ap.add_argument("--budget", type=float, default=0.05, help="fraction of pages attended (0.05)")
    ap.add_argument("--cache", type=float, default=None,
                    help="GPU page cache of offload/hybrid as a share of the batch's pages (default: "
                    "every slot the HBM for KV holds beside the tail pages and summaries)")
    ap.add_argument("--gpu-memory-gib", type=float, default=None,
                    help="HBM for KV of every mode (default: what the weights leave, less "
                    "--hbm-reserve-gib and a prompt)")
    ap.add_argument("--locality", choices=("flow", "real"), default="flow",
                    help="selections: the flow's on the random model (no locality), or a stream with "
                    "--reuse kept step to step (default flow)")
    ap.add_argument("--reuse", type=float, default=0.8,
                    help="share of selected pages kept from the step before with --locality real")
    ap.add_argument("--graphs", choices=("whole", "layers"), default="whole",
                    help="whole: each step is one CUDA graph (model and runtime, the CPU hand-off "
                         "inside; the step planned with whole_step=True); layers: the runtime's "
                         "per-layer graphs between the model's (default whole)")
    ap.add_argument("--micro-batches", type=int, default=1, metavar="N",
                    help="host placements in whole steps: the batch as N micro-batches staggered "
                         "by a layer, one runtime of 1/N of the memory each, their CPU parts on "
                         "one worker, so the CPU attends one while the GPU runs another (1: off; "
                         "measured slower than one batch, docs/BENCHMARKS.md)")
    ap.add_argument("--overlap-back", action="store_true",
                    help="with --micro-batches: each part's fetches and GPU attention on a stream "
                         "of its own, overlapping the other part's GPU work (MicroBatches "
                         "overlap_back)")
    ap.add_argument("--fuse", choices=("on", "off"), default=None,
                    help="torch.compile the model's per-layer math (fused elementwise ops; the "
                         "same in every mode); default on with CUDA, off without")
    ap.add_argument("--cpu-threads", type=int, default=None,
                    help="threads of the CPU attention (HybridConfig.cpu_threads; default: the "
                         "cores less the driving thread's and, in whole steps, the hand-off's)")
    ap.add_argument("--defer-finish", action="store_true",
                    help="whole steps end with finish_step(wait=False): the next step's plan() "
                         "runs while the step runs, no synchronisation between timed steps "
                         "(ms/step is then the timed steps' mean, and plan ms includes plan()'s "
                         "wait for the step before)")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more step per mode after the timed ones (torch.profiler): "
                         "its kernels by GPU time, in profile_<mode>.txt under --out")
    ap.add_argument("--cpu-replay", type=int, default=0, metavar="N",
                    help="host placements in whole steps: after the timed steps, run the last "
                         "step's last CPU part N more times outside the step (from this thread, "
                         "with gaps, from a new thread) and report its time per call (0: off)")
    ap.add_argument("--summary-dtype", default="bfloat16", choices=SUMMARY_DTYPES,
                    help="page summaries' dtype (bfloat16, the runtime's default; float8_e4m3fn "
                         "leaves the most HBM to "
                         "the GPU page cache)")
    ap.add_argument("--fetch-programs", type=int, default=None, metavar="N",
                    help="host placements: the most GPU programs a layer's fetch uses for each "
                         "of K and V (HybridConfig.fetch_programs; default one per head-page)")
    ap.add_argument("--fetch-share", type=float, default=1.0,
                    help="hybrid: the most a layer's page cache fetches in a step, as a share of "
                         "its selected head-pages (HybridConfig.fetch_share; 1.0)")
    ap.add_argument("--no-cached-steps", action="store_true",
                    help="offload/hybrid: split every step, even while the GPU page cache holds "
                         "the whole batch (HybridConfig.cached_steps=False; for comparison)")
    ap.add_argument("--compile-cache-step", action="store_true",
                    help="offload/hybrid: the page cache's step compiled by torch.compile "
                         "(HybridConfig.compile_cache_step; compiles during the warm-up)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per mode (32)")
    ap.add_argument("--warmup", type=int, default=6,
                    help="untimed steps first (6: hybrid's step-shape choice measures 4)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
    ap.add_argument("--dtype", default="bfloat16", help="weights and KV: bfloat16 or float32")
    ap.add_argument("--page-size", type=int, default=16, help="tokens per page (16)")
    ap.add_argument("--hbm-reserve-gib", type=float, default=3.0,
                    help="HBM kept free when sizing dense/gpu batches (3)")
    ap.add_argument("--host-reserve-gib", type=float, default=8.0,
                    help="host memory kept free when sizing host batches (8: with 4, a 125 GiB "
                         "machine's hybrid run took 27 x 32K requests, 108.3 GiB pinned, and "
                         "stalled twice without a result; 26 never did; cause not found)")
    ap.add_argument("--time-limit", type=float, default=510,
                    help="seconds (510): skip a mode the last one says would end later")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, float32, batch 2, short context, dense/gpu/hybrid, a GPU cache of 10%% of the pages (CI, CPU)")
    ap.add_argument("--out", default="results", help="folder for e2e_decode.json / .md")
    args = ap.parse_args(argv)
    args.shape = Shape()
    if args.smoke:                  # smoke values unless the command line set them
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:])
                 if a.startswith("--")}
        for key, value in SMOKE.items():
            if key not in given:
                setattr(args, key, value)
    if args.layers is not None:
        if args.layers < 1:
            fail(f"--layers={args.layers} must be a positive integer")
        args.shape = Shape(**dict(asdict(args.shape), layers=args.layers))
    if args.fuse is None:
        args.fuse = "on" if torch.cuda.is_available() else "off"
    modes = [x for x in args.modes.split(",") if x]
    bad = [x for x in modes if x not in MODES]
    if bad or not modes:
        fail(f"--modes={args.modes!r}: allowed are {','.join(MODES)}")
    args.mode_list = [x for x in MODES if x in modes]
    for name in ("context", "steps", "page_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
    if args.dtype not in ("bfloat16", "float32"):
        fail(f"--dtype={args.dtype!r}: allowed are bfloat16,float32")
    if args.warmup < 0:
        fail(f"--warmup={args.warmup} must be >= 0")
    if args.page_size & (args.page_size - 1):
        fail(f"--page-size={args.page_size} must be a power of two")
    grow = args.warmup + args.steps
    if args.context - grow < 4 * args.page_size:
        fail(f"--context={args.context} leaves {args.context - grow} prompt tokens after the {grow} "
             f"steps; raise --context or lower --steps/--warmup")
    if not 0 < args.budget <= 1:
        fail(f"--budget={args.budget} must lie in (0, 1]")
    if args.cache is not None and not 0 < args.cache <= 1:
        fail(f"--cache={args.cache} must lie in (0, 1]")
    if not 0 <= args.reuse <= 1:
        fail(f"--reuse={args.reuse} must lie in [0, 1]")
    if args.micro_batches < 1:
        fail(f"--micro-batches={args.micro_batches} must be a positive integer")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        fail(f"--cpu-threads={args.cpu_threads} must be a positive integer")
    if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        fail(f"--gpu-memory-gib={args.gpu_memory_gib} must be positive")
    try:
        HybridConfig(flow=args.flow, page_size=args.page_size)
    except ValueError as exc:
        fail(f"--flow={args.flow!r}: {exc}")
    return args


def report(result: dict) -> str:
    """The markdown table of the modes, ratios first."""
    head = ["mode", "x dense", "tokens/s", "batch", "context", "ms/step", "plan ms", "LB ms",
            "of LB", "KV MB/token", "hit", "CPU wait", "CPU parts ms", "of which kernel", "PCIe GB",
            "CPU GB", "step ran", "shape", "HBM GiB", "host GiB", "slots", "reuse", "build s"]
    lines = [[r["mode"], fmt(r.get("vs_dense"), ".2f", "x"), f"{r['tokens_per_s']:.1f}",
              str(r["batch"]) + (" (" + "+".join(map(str, r["micro_batches"])) + ")"
                                 if len(r.get("micro_batches", [])) > 1 else ""),
              str(result["context"]), f"{r['ms_per_step']:.2f}", fmt(r.get("plan_ms"), ".2f"),
              f"{r['lower_bound_ms']:.2f}",
              f"{r['of_lower_bound']:.0%}", f"{r['kv_bytes_per_token'] / 1e6:.2f}",
              fmt(r["hit_rate"]), fmt(r["cpu_wait_frac"]), f"{r.get('cpu_part_ms', 0):.1f}",
              f"{r.get('cpu_kernel_ms', 0):.1f}", f"{r['pcie_bytes_per_step'] / 1e9:.2f}", f"{r['cpu_bytes_per_step'] / 1e9:.2f}",
              "/".join(r.get("step_ran", [])) or "-", r.get("step_shape") or "-",
              f"{r['hbm_gib']:.1f}",
              f"{r['host_gib']:.1f}", str(r["gpu_cache_pages"]), fmt(r.get("reuse")),
              f"{r['build_s']:.0f}"] for r in result["modes"]]
    md = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    md += ["| " + " | ".join(x) + " |" for x in lines]
    table(head, lines)
    return "\n".join(md)


def main(argv=None) -> dict:
    args = parse(argv)
    s, t_start = args.shape, time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"seed {args.seed}; device {dev}; shape {s}; modes {','.join(args.mode_list)}", flush=True)
    torch.manual_seed(args.seed)
    with torch.inference_mode():
        m = Decoder(s, getattr(torch, args.dtype), dev, args.seed)
        z = size_batches(args, s, dev)          # HBM after the weights
        batches = choose_batches(args, z, s, args.mode_list, dev)
        costs = cost_model.measure(quick=True) if dev.type == "cuda" else cost_model.DEFAULTS
        print(f"ceilings ({'measured' if dev.type == 'cuda' else 'H100 defaults'}): hbm "
              f"{costs.hbm_bw / 1e9:.0f} GB/s, h2d {costs.h2d_bw / 1e9:.1f} GB/s, cpu attention "
              f"{costs.cpu_attn_bw / 1e9:.1f} GB/s", flush=True)
        print(f"model: {m.params / 1e9:.3f} B parameters ({m.bytes_per_step / GIB:.2f} GiB read per "
              f"step), random weights; prompt {z.prefill} tokens + {args.warmup + args.steps} steps = "
              f"{args.context}; usable HBM {z.hbm_usable:.1f} GiB, host {z.host_usable:.1f} GiB; "
              f"batches {batches}", flush=True)
        os.makedirs(args.out, exist_ok=True)
        result = dict(question=__doc__.split("\n\n")[0], device=torch.cuda.get_device_name(dev)
                      if dev.type == "cuda" else f"CPU only ({platform.machine()})",
                      cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                      args={k: v for k, v in vars(args).items() if k != "shape"}, shape=asdict(s),
                      params=m.params, weight_bytes_per_step=m.bytes_per_step, context=args.context,
                      sizes=asdict(z), costs=costs.to_dict(), modes=[], skipped=[], notes=[
                          "random weights, synthetic prompt KV (V = K); prefill not measured",
                          "dense at the host placements' batch cannot run: its KV does not fit"] +
                      ([] if dev.type == "cuda" else ["no CUDA: eager steps, the runtime's GPU side "
                                                      "is the torch reference, ceilings are H100 "
                                                      "defaults; timings say nothing about a GPU"]))
        last = 0.0
        for mode in args.mode_list:
            elapsed = time.perf_counter() - t_start
            if batches[mode] < 1:
                result["skipped"].append(f"{mode}: not even one request fits")
                continue
            if elapsed + last > args.time_limit:
                result["skipped"].append(f"{mode}: time limit ({elapsed:.0f} s elapsed, last mode "
                                         f"took {last:.0f} s)")
                continue
            t0 = time.perf_counter()
            try:
                rec = run_mode(mode, batches[mode], m, z, args, costs, dev)
            except Exception as exc:                       # out of memory, say: record it, go on
                result["skipped"].append(f"{mode}: failed: {exc!r}"[:400])
                print(f"  {mode} FAILED: {exc!r}"[:400], flush=True)
                rec = None
            release_memory(host=mode in HOST_PLACEMENTS)
            last = time.perf_counter() - t0
            if rec is not None:
                result["modes"].append(rec)
                print(f"[{time.perf_counter() - t_start:5.0f} s] {mode}: batch {rec['batch']}, "
                      f"{rec['tokens_per_s']:.1f} tokens/s, {rec['ms_per_step']:.2f} ms/step "
                      f"(lower bound {rec['lower_bound_ms']:.2f}), built in {rec['build_s']:.0f} s, "
                      f"{last:.0f} s in all", flush=True)
            save(result, args)
        finish(result, z, args)
        save(result, args)
    print(f"json: {os.path.join(args.out, 'e2e_decode.json')}; total "
          f"{time.perf_counter() - t_start:.0f} s")
    for note in result["notes"] + [f"skipped: {x}" for x in result["skipped"]]:
        print(f"note: {note}")
    md = report(result)
    with open(os.path.join(args.out, "e2e_decode.md"), "w") as fh:
        fh.write(md + "\n")
    return result


def finish(result: dict, z: Sizes, args) -> None:
    """Ratios to dense, the goal, and the ratio hybrid would reach at its own lower bound."""
    by = {r["mode"]: r for r in result["modes"]}
    dense = by.get("dense")
    for r in result["modes"]:
        r["vs_dense"] = r["tokens_per_s"] / dense["tokens_per_s"] if dense else None
    hyb = by.get("hybrid")
    if dense and hyb:
        ratio = hyb["vs_dense"]
        at_lb = hyb["batch"] / hyb["lower_bound_ms"] * 1e3 / dense["tokens_per_s"]
        result["goal"] = dict(hybrid_vs_dense=ratio, goal=GOAL, met=ratio >= GOAL,
                              hybrid_at_lower_bound_vs_dense=at_lb,
                              batch_ratio=hyb["batch"] / dense["batch"])
        line = f"goal: hybrid / dense = {ratio:.2f}x (goal >= {GOAL}x: " + \
            ("met)" if ratio >= GOAL else "MISSED)")
        if ratio < GOAL:
            line += (f"; host memory holds {hyb['batch']} requests against dense's {dense['batch']} "
                     f"({hyb['batch'] / dense['batch']:.2f}x), and at its own lower bound (bytes "
                     f"moved / measured ceilings) hybrid would reach {at_lb:.2f}x dense")
        result["notes"].append(line)
    if "gpu" in by and dense:
        result["notes"].append(f"gpu (sparse, KV in HBM) / dense = {by['gpu']['vs_dense']:.2f}x at "
                               f"batches {by['gpu']['batch']} / {dense['batch']}")
    if z.host and z.dense:
        result["notes"].append(f"host batch {z.host} vs dense {z.dense}: {z.host_usable:.0f} GiB of "
                               f"host memory usable, {z.hbm_usable:.1f} GiB of HBM for KV")


def save(result: dict, args) -> None:
    out = dict(result, modes=[{k: v for k, v in r.items() if k != "logits"} for r in result["modes"]])
    with open(os.path.join(args.out, "e2e_decode.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
