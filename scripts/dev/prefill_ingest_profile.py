"""The SGLang plugin's prefill ingest, reproduced without SGLang: what `RequestMap.sync` and the
backend's `_stage` do to the runtime for a chunked 32K prompt, profiled per chunk.

    python scripts/dev/prefill_ingest_profile.py                    # 8 layers, 3 requests, CPU
    python scripts/dev/prefill_ingest_profile.py --layers 32 --requests 1
    python scripts/dev/prefill_ingest_profile.py --cprofile 25      # and cProfile's top 25
    python scripts/dev/prefill_ingest_profile.py --torch-profile    # and torch.profiler's table

The runtime is built as the plugin builds it for `hybrid` (`VortexHybridBackend.__init__`: the
memory plan's device_pages = TAIL_PAGES + GPU cache slots, host_pages for the prompts) with
Llama-3-8B KV shapes (8 KV heads, 32 query heads, head_dim 128, page 16, quest, 5% budget, bf16
KV, float8 summaries and 4,396 cache pages as in the 12 GiB SGLang run of docs/BENCHMARKS.md).
Each request: `add_request` of an 8K chunk, then per later chunk `kv.read_tokens(rid, 0, start)`
(the backend's `_stage` restaging the earlier chunks) and `extend_request` of 8K.

On a machine without CUDA the "GPU" is the CPU (the runtime's torch reference, `device="cpu"`), so
every op here is a CPU op; what it counts stands for the launches and host round trips each chunk
issues on a GPU. Per chunk it reports:
- ops: aten ops that run a kernel (counted at the dispatcher, `TorchDispatchMode`; views and
  other metadata-only ops are counted apart, as `views`), and the Python functions of the project
  that issue the most of them (the innermost project frame of each op);
- syncs: calls that wait for the device on a GPU: `.item()` / `int()` / `float()` / `bool()` of a
  tensor (aten `_local_scalar_dense`), `.tolist()`, `nonzero` (its size is read back), and a
  tensor made from Python data onto the runtime's device (`h2d_lists`: `torch.as_tensor(list)` /
  `torch.tensor(list)` followed by `.to(device)`; on CUDA a pageable copy that waits);
- wall seconds on this machine.
Ops inside the CPU kernels' launchers (`cpu_kernels`: quest's page summaries here) are counted
apart ("in CPU kernels"): on a GPU each launcher call is one Triton launch instead (not in `ops`;
quest's summaries: one launch a layer per append).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from vortex_hybrid import HybridAttention, HybridConfig  # noqa: E402
from vortex_hybrid.runtime.memory_model import TAIL_PAGES  # noqa: E402
from vortex_hybrid.scheduler import cost_model  # noqa: E402

import vortex_hybrid  # noqa: E402

ROOT = Path(vortex_hybrid.__file__).resolve().parents[1]       # the checkout imported (editable)
PROJECT_DIRS = tuple(str(ROOT / d) for d in ("vortex_hybrid", "scheduler", "cpu_kernels",
                                             "gpu_kernels", "predictors"))
VIEW_OPS = {"view", "_unsafe_view", "slice", "select", "t", "transpose", "expand", "unsqueeze",
            "squeeze", "as_strided", "alias", "detach", "permute", "unbind", "split",
            "split_with_sizes", "reshape", "flatten", "view_as", "unflatten", "chunk", "narrow",
            "lift_fresh", "_reshape_alias", "diagonal", "empty", "empty_like", "empty_strided",
            "sym_size", "sym_stride", "sym_numel", "is_same_size", "resolve_conj",
            "resolve_neg", "contiguous"}
"""Ops that run no kernel (metadata only, or no-ops on the tensors here); `to` and `contiguous`
count as ops only when they return a new tensor (a copy)."""
SYNC_OPS = {"_local_scalar_dense", "nonzero", "item", "is_nonzero"}


CPU_KERNELS = str(ROOT / "cpu_kernels")


def _site() -> str:
    """The innermost project frame of the current Python stack, as file.function; ops issued
    inside the CPU kernels' launchers (what one Triton launch does on a GPU) are named
    "cpu_kernels:" + the launcher."""
    stack = traceback.extract_stack(limit=40)
    for fr in stack:
        if fr.filename.startswith(CPU_KERNELS):
            return f"cpu_kernels:{Path(fr.filename).stem}.{fr.name}"
    for fr in reversed(stack):
        if fr.filename.startswith(PROJECT_DIRS):
            return f"{Path(fr.filename).stem}.{fr.name}"
    return "(outside the project)"


class Counter(TorchDispatchMode):
    """Counts aten ops at the dispatcher, each attributed to the project function issuing it."""

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self):
        self.ops = 0
        self.kernel_ops = 0
        self.views = 0
        self.syncs = 0
        self.tolist = 0
        self.h2d_lists = 0
        self.by_site = collections.Counter()
        self.sync_sites = collections.Counter()
        self.by_op = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name in ("to", "contiguous") and out is args[0]:
            name = "view"
        if name in VIEW_OPS:
            self.views += 1
        else:
            site = _site()
            if site.startswith("cpu_kernels:"):     # inside a launcher: one launch on a GPU
                self.kernel_ops += 1
                return out
            self.ops += 1
            self.by_site[site] += 1
            self.by_op[name] += 1
            if name in SYNC_OPS:
                self.syncs += 1
                self.sync_sites[site] += 1
        return out


COUNTER: Counter | None = None


def _patch_host_calls():
    """Count `.tolist()` (a device read on a GPU) and tensors made from Python sequences (then
    copied to the device: on CUDA a pageable H2D copy each)."""
    tolist, as_tensor, tensor = torch.Tensor.tolist, torch.as_tensor, torch.tensor

    def counted_tolist(self):
        if COUNTER is not None and torch._C._get_dispatch_mode(
                torch._C._TorchDispatchModeKey.FUNCTIONAL) is None:
            COUNTER.tolist += 1
            COUNTER.syncs += 1
            COUNTER.sync_sites[_site() + " (tolist)"] += 1
        return tolist(self)

    def counted(fn):
        def wrapper(data, *a, **kw):
            if COUNTER is not None and not isinstance(data, torch.Tensor) and \
                    isinstance(data, (list, tuple, range)) and len(data) > 1:
                COUNTER.h2d_lists += 1
                COUNTER.by_site[_site() + " (from a list)"] += 1
            return fn(data, *a, **kw)
        return wrapper

    torch.Tensor.tolist = counted_tolist
    torch.as_tensor = counted(as_tensor)
    torch.tensor = counted(tensor)


def build(args) -> HybridAttention:
    cfg = HybridConfig(page_size=16, flow="quest", budget_ratio=0.05, placement="hybrid",
                       kv_dtype="bfloat16", summary_dtype=args.summary_dtype,
                       gpu_cache_pages=args.slots)
    pages = args.chunks * args.chunk // 16
    return HybridAttention(cfg, args.layers, 32, 8, 128, device_pages=TAIL_PAGES + args.slots,
                           host_pages=args.requests * pages + 64, device=args.device,
                           costs=cost_model.DEFAULTS)


def main() -> None:
    global COUNTER
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=4, help="chunks a prompt (default 4 x 8K)")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--slots", type=int, default=4396, help="GPU cache pages")
    ap.add_argument("--summary-dtype", default="float8_e4m3fn")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-count", action="store_true", help="wall time only (no dispatch mode)")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="also run under cProfile and print the top N by cumulative time")
    ap.add_argument("--torch-profile", action="store_true",
                    help="also print torch.profiler's op table of the whole run")
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()
    dev = torch.device(args.device)
    attn = build(args)
    print(f"device {dev}; {args.layers} layers x 8 KV heads x 128, page 16, quest 5%, bf16 KV, "
          f"{args.summary_dtype} summaries; device pages {attn.kv.device_alloc.num_pages} "
          f"({attn.memory.gpu_cache_pages} cache slots), host pages {attn.kv.host_alloc.num_pages};"
          f" {args.requests} requests x {args.chunks} chunks of {args.chunk}")
    warm = torch.zeros(args.layers, 4 * 16 + 3, 8, 128, dtype=torch.bfloat16, device=dev)
    w = attn.add_request(warm, warm)          # JIT / first-call costs out of the measurement
    attn.extend_request(w, warm, warm)
    attn.kv.read_tokens(w, 0, 16, dev)
    attn.remove_request(w)
    gen = torch.Generator().manual_seed(0)
    kv_chunk = tuple(torch.randn(args.layers, args.chunk, 8, 128, generator=gen)
                     .to(torch.bfloat16).to(dev) for _ in "kv")
    chunks = [kv_chunk] * args.chunks       # one chunk's KV for every chunk: the values do not
                                            # matter here, the memory does (32 layers: 1 GiB)
    if not args.no_count:
        _patch_host_calls()
        COUNTER = Counter()
    rows = []

    def one_request(r: int) -> None:
        rid = None
        for c, (k, v) in enumerate(chunks):
            phases = []
            if rid is not None:
                start = attn.kv.seq_len(rid)
                phases.append(("read_tokens", lambda: attn.kv.read_tokens(rid, 0, start, dev)))
                phases.append(("extend_request", lambda: attn.extend_request(rid, k, v)))
            else:
                phases.append(("add_request", None))
            for name, fn in phases:
                if COUNTER is not None:
                    COUNTER.reset()
                t0 = time.perf_counter()
                if COUNTER is not None:
                    with COUNTER:
                        out = attn.add_request(k, v) if fn is None else fn()
                else:
                    out = attn.add_request(k, v) if fn is None else fn()
                wall = time.perf_counter() - t0
                if fn is None:
                    rid = out
                rows.append((r, c, name, wall, None if COUNTER is None else _snapshot(COUNTER)))

    def run_all() -> None:
        for r in range(args.requests):
            one_request(r)

    t0 = time.perf_counter()
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            run_all()
        print(prof.key_averages().table(sort_by="count", row_limit=25))
    elif args.cprofile:
        pr = cProfile.Profile()
        pr.enable()
        run_all()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(args.cprofile)
        print(s.getvalue())
    else:
        run_all()
    total = time.perf_counter() - t0
    _report(rows, args.top)
    print(f"total {total:.2f} s over {args.requests} requests "
          f"({sum(w for *_, w, _ in rows):.2f} s in the calls)")
    attn.close()


def _snapshot(c: Counter) -> dict:
    return {"ops": c.ops, "kernel_ops": c.kernel_ops, "views": c.views, "syncs": c.syncs,
            "tolist": c.tolist,
            "h2d_lists": c.h2d_lists, "by_site": c.by_site.copy(),
            "sync_sites": c.sync_sites.copy(), "by_op": c.by_op.copy()}


def _report(rows, top: int) -> None:
    print(f"{'req':>3} {'chunk':>5} {'call':<15} {'wall s':>7} {'ops':>6} {'in CPU kernels':>14} "
          f"{'views':>6} {'syncs':>5} {'lists':>5}  top issuers (ops)")
    for r, c, name, wall, snap in rows:
        if snap is None:
            print(f"{r:>3} {c:>5} {name:<15} {wall:7.3f}")
            continue
        sites = ", ".join(f"{s} {n}" for s, n in snap["by_site"].most_common(top))
        print(f"{r:>3} {c:>5} {name:<15} {wall:7.3f} {snap['ops']:>6} {snap['kernel_ops']:>14} "
              f"{snap['views']:>6} "
              f"{snap['syncs']:>5} {snap['h2d_lists']:>5}  {sites}")
    snaps = [s for *_, s in rows if s is not None]
    if snaps:
        last = rows[-1][4]
        print("\nlast call's syncs by site:", dict(last["sync_sites"].most_common(top)))
        print("last call's ops by aten op:", dict(last["by_op"].most_common(12)))
        print(f"all calls: {sum(s['ops'] for s in snaps)} ops, "
              f"{sum(s['syncs'] for s in snaps)} syncs, {sum(s['h2d_lists'] for s in snaps)} "
              "tensors from lists")


if __name__ == "__main__":
    sys.exit(main())
