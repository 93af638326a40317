"""Machine costs: the bandwidths and fixed per-call costs the runtime's scheduling reads.

`MachineCosts` (bytes/s, seconds): hbm_bw (device copy, read + write bytes), h2d_bw (pinned host ->
GPU alone), cpu_attn_bw (CPU sparse attention alone, KV bytes read), cpu_attn_bw_concurrent /
h2d_bw_concurrent (each while the other runs: host DRAM is one budget, docs/hardware.md),
gpu_launch_s (host time of one eager GPU call), cpu_call_s (fixed time of one CPU kernel call),
and `measured`: which of them were measured on this machine (the rest are `DEFAULTS`, the H100
figures of docs/hardware.md). Their readers: `step_shape.launch_order` (every host placement) and,
in `hybrid`, the page-by-page split (`HybridAttention._hybrid_fetch`) and the subbatch share
(`HybridAttention._cpu_row_share`); `NEEDS` lists each placement's.

`measure()` takes them on this machine (without CUDA only CPU_FIELDS); `load_or_measure()` keeps
a complete measurement per machine in `cache_path()` (`$VORTEX_HYBRID_CACHE` or
~/.cache/vortex_hybrid) and never caches a failed one; `costs_for(placement)` is what the runtime
plans with when given no costs, and logs once the figures it reads that are defaults.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import socket
import statistics
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NUMERIC = ("hbm_bw", "h2d_bw", "cpu_attn_bw", "cpu_attn_bw_concurrent", "h2d_bw_concurrent",
           "gpu_launch_s", "cpu_call_s")
CPU_FIELDS = ("cpu_attn_bw", "cpu_call_s")      # measurable without a GPU (the rest need CUDA)
PAIRS = (("cpu_attn_bw", "cpu_attn_bw_concurrent"), ("h2d_bw", "h2d_bw_concurrent"))  # solo, concurrent
LEGACY_KEYS = ("source",)      # older files' one-word provenance ("measured" even when partial)
CACHE_ENV = "VORTEX_HYBRID_CACHE"
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class MachineCosts:
    """Bandwidths in bytes/s, fixed per-call costs in seconds, and which of them were measured.

    measured: the numeric fields measured on the machine `fingerprint` names (in NUMERIC order);
    every other one (`defaulted`) is a default, `DEFAULTS`' H100 figure (a concurrent default above
    its measured solo figure is lowered to it). JSON (`to_dict`) lists both; `from_dict` checks that
    they agree, ignores LEGACY_KEYS, and reads a file without `measured` as all defaulted: a figure
    whose provenance is unknown is never taken as measured."""
    hbm_bw: float
    h2d_bw: float
    cpu_attn_bw: float
    cpu_attn_bw_concurrent: float
    h2d_bw_concurrent: float
    gpu_launch_s: float
    cpu_call_s: float
    device: str = ""
    date: str = ""
    fingerprint: str = ""          # machine_fingerprint() of the machine measured
    measured: tuple = ()           # names of the numeric fields measured (the rest are defaults)
    notes: str = ""

    def __post_init__(self):
        for name in NUMERIC:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive finite number")
        for solo, conc in PAIRS:
            if getattr(self, conc) > getattr(self, solo):
                raise ValueError(f"{conc}={getattr(self, conc)!r} must be <= {solo}={getattr(self, solo)!r}")
        bad = [n for n in ("device", "date", "fingerprint", "notes") if not isinstance(getattr(self, n), str)]
        if bad:
            raise ValueError(f"{bad[0]}={getattr(self, bad[0])!r} must be a string")
        m = self.measured
        if not isinstance(m, (tuple, list, set, frozenset)) or \
                not all(isinstance(k, str) and k in NUMERIC for k in m) or len(set(m)) != len(m):
            raise ValueError(f"measured={m!r} must list distinct fields of {NUMERIC}")
        object.__setattr__(self, "measured", tuple(k for k in NUMERIC if k in m))

    @property
    def defaulted(self) -> tuple:
        """The numeric fields not measured (defaults), in NUMERIC order."""
        return tuple(k for k in NUMERIC if k not in self.measured)

    def summary(self) -> str:
        """One line: each figure (GB/s or us), the measured ones, then the defaulted ones."""
        def fig(k):
            v = getattr(self, k)
            return f"{k} {v * 1e6:.0f} us" if k.endswith("_s") else f"{k} {v / 1e9:.1f} GB/s"
        parts = [f"{label}: {', '.join(map(fig, keys))}" for label, keys in
                 (("measured", self.measured), ("defaulted", self.defaulted))
                 if keys]
        return f"machine costs ({self.device or 'no device'}): " + "; ".join(parts)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["measured"], d["defaulted"] = list(self.measured), list(self.defaulted)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MachineCosts":
        if not isinstance(d, dict):
            raise ValueError(f"machine costs must be a JSON object, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k not in LEGACY_KEYS}
        defaulted = d.pop("defaulted", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = [k for k in d if k not in known], [k for k in NUMERIC if k not in d]
        if unknown or missing:
            raise ValueError(f"machine costs: unknown fields {unknown}, missing fields {missing}")
        costs = cls(**d)
        if defaulted is not None and (not isinstance(defaulted, list) or
                                      sorted(defaulted) != sorted(costs.defaulted)):
            raise ValueError(f"defaulted={defaulted!r} must list the fields not in "
                             f"measured={list(costs.measured)}")
        return costs

    def save(self, path) -> None:
        """Write JSON atomically (a temporary file, then a rename)."""
        tmp = Path(f"{path}.{os.getpid()}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "MachineCosts":
        return cls.from_dict(json.loads(Path(path).read_text()))


DEFAULTS = MachineCosts(
    hbm_bw=3000e9, h2d_bw=55e9, cpu_attn_bw=52e9, cpu_attn_bw_concurrent=34e9, h2d_bw_concurrent=54e9,
    gpu_launch_s=120e-6, cpu_call_s=50e-6, device="NVIDIA H100 80GB HBM3 (docs)",
    notes="docs/hardware.md figures of the H100 machine (cpu_attn_bw_concurrent: with a core left "
          "for the copy's thread); gpu_launch_s from the 72-174 us eager-launch range; "
          "cpu_call_s assumed (not in hardware.md)")


# ---- measurement -----------------------------------------------------------------------------------
HKV, PAGE, HEAD_DIM, HQ = 8, 16, 128, 32        # Llama-3-8B shapes, bf16
PAGE_KV_BYTES = 2 * HKV * PAGE * HEAD_DIM * 2   # K+V of one page, all heads: 64 KiB


def machine_fingerprint() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"gpu={gpu}|cpus={os.cpu_count()}|host={socket.gethostname()}"


def _median_call(fn, min_reps: int, min_s: float, max_s: float) -> float:
    """Median wall seconds of fn(0), fn(1), ... after a warm-up fn(-1) (min_reps and min_s, or max_s)."""
    fn(-1)
    times, t_start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - t_start < min_s:
        t0 = time.perf_counter()
        fn(len(times))
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > max_s and len(times) >= 3:
            break
    return statistics.median(times)


def _cpu_inputs(set_bytes: int, n_sets: int, pin: bool):
    """Attention inputs over a bf16 host pool of n_sets disjoint page sets (cycled, so a set is out of
    the LLC when read again); each selects every page of its set through a random page table."""
    gen = torch.Generator().manual_seed(0)
    set_pages = max(4, set_bytes // PAGE_KV_BYTES)
    n, B, K = set_pages * n_sets, 4, set_pages // 4
    flat = torch.empty(2 * n * HKV * PAGE * HEAD_DIM, dtype=torch.bfloat16, pin_memory=pin)
    flat.fill_(0.01)                                         # touch every page (no shared zero page)
    k_pool, v_pool = flat.view(2, n, HKV, PAGE, HEAD_DIM).unbind(0)
    sel = torch.arange(K, dtype=torch.int32).expand(B, HKV, K).contiguous()
    sets = [(torch.randn(B, HQ, HEAD_DIM, generator=gen), k_pool, v_pool,
             (s * set_pages + torch.randperm(set_pages, generator=gen)[:B * K]).reshape(B, K).int(),
             torch.full((B,), K * PAGE, dtype=torch.int32), sel) for s in range(n_sets)]
    return sets, B * K * PAGE_KV_BYTES


def _tiny_args(q, page_table, k_pool=None, v_pool=None) -> list:
    """Attention args of one request selecting one page per KV head (fixed per-call costs)."""
    return [q, k_pool, v_pool, page_table, torch.full((1,), PAGE, dtype=torch.int32),
            torch.zeros(1, HKV, 1, dtype=torch.int32)]


class BackgroundCopy:
    """Pinned host -> GPU copies kept running by a thread on a side stream while the `with` block
    runs (64 MiB chunks of `src`, cycled): the PCIe traffic a host placement's fetches make.
    duty < 1 idles after each chunk so that copies take that share of the time. `rate()`: bytes/s
    of the chunks copied wholly inside the block (all of them when none was). A failed copy thread
    raises RuntimeError at exit."""

    def __init__(self, src: torch.Tensor, duty: float = 1.0, chunk: int = 64 * MIB) -> None:
        if not 0 < duty <= 1:
            raise ValueError(f"duty={duty!r} must be in (0, 1]")
        self.chunks = src.flatten().view(torch.uint8).split(chunk)     # bytes
        self.duty, self.chunk = duty, chunk
        self.spans: list = []
        self._stop, self._errors = threading.Event(), []

    def _run(self) -> None:
        # Its own destination, made in this thread: inference mode is thread-local, and a tensor
        # made under the caller's inference mode cannot be written here outside it.
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                dst = torch.empty(self.chunk, dtype=torch.uint8, device="cuda")
                while not self._stop.is_set():
                    src = self.chunks[len(self.spans) % len(self.chunks)]
                    t0 = time.perf_counter()
                    dst[:src.numel()].copy_(src, non_blocking=True)
                    stream.synchronize()
                    t1 = time.perf_counter()
                    self.spans.append((t0, t1, src.numel()))
                    if self.duty < 1:
                        time.sleep((t1 - t0) * (1 / self.duty - 1))
        except Exception as exc:                                          # raised at exit
            self._errors.append(exc)

    def __enter__(self) -> "BackgroundCopy":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        while not self.spans and self._thread.is_alive():
            time.sleep(1e-4)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.t1 = time.perf_counter()
        self._stop.set()
        self._thread.join()
        if self._errors or not self.spans:
            raise RuntimeError("the concurrent copy thread failed: "
                               f"{self._errors[0] if self._errors else 'no copy'}")

    def rate(self) -> float:
        """Bytes/s while copying (the chunks wholly inside the block)."""
        inside = [s for s in self.spans if s[0] >= self.t0 and s[1] <= self.t1] or self.spans
        return sum(s[2] for s in inside) / sum(s[1] - s[0] for s in inside)

    def share(self) -> float:
        """Bytes/s over the block's whole time (the copy's average while duty < 1)."""
        inside = [s for s in self.spans if s[0] >= self.t0 and s[1] <= self.t1] or self.spans
        return sum(s[2] for s in inside) / max(1e-9, inside[-1][1] - inside[0][0])


def _cuda_measure(quick: bool, cpu_call, cpu_bytes: int) -> dict:
    """HBM copy, pinned H2D alone, host time of an eager GPU attention call, and CPU attention
    (`cpu_call` over `cpu_bytes`) while a background thread keeps pinned H2D copies running (both
    concurrent rates)."""
    n = (256 if quick else 1024) * MIB
    h2d_src = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    a, b = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")

    def event_rate(fn, nbytes, reps):
        fn()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(reps):
            fn()
        ev[1].record()
        ev[1].synchronize()
        return nbytes * reps / (ev[0].elapsed_time(ev[1]) / 1e3)

    out = {"hbm_bw": event_rate(lambda: b.copy_(a), 2 * n, 10)}           # read + write bytes
    dst = a[:h2d_src.numel()]
    out["h2d_bw"] = event_rate(lambda: dst.copy_(h2d_src, non_blocking=True), h2d_src.numel(), 5)
    from vortex_hybrid.gpu_kernels import launch_sparse_decode_attention as gpu_attn
    kp = torch.zeros(2, HKV, PAGE, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    args = [t.cuda() for t in _tiny_args(torch.zeros(1, HQ, HEAD_DIM), torch.zeros(1, 1, dtype=torch.int32),
                                         kp, kp)]
    gpu_attn(*args)                                                       # compile outside the timing
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        gpu_attn(*args)
    out["gpu_launch_s"] = (time.perf_counter() - t0) / 50                # host time per eager call
    torch.cuda.synchronize()
    # The copy's thread needs a core of its own: CPU attention on every core beside it stalls on
    # the descheduled thread (benchmarks/host_contention.py), so the concurrent figure is taken
    # with the cores less two, as whole steps run it (a core for the GPU's thread, one for the
    # hand-off worker).
    from vortex_hybrid import cpu_kernels
    before = cpu_kernels.cpu_threads()
    cpu_kernels.set_cpu_threads(max(1, (os.cpu_count() or 3) - 2))
    try:
        with BackgroundCopy(h2d_src) as copy:
            sec = _median_call(cpu_call, 3, 0.2 if quick else 1.0, 0.6 if quick else 3.0)
    finally:
        cpu_kernels.set_cpu_threads(before)
    out["cpu_attn_bw_concurrent"] = cpu_bytes / sec
    out["h2d_bw_concurrent"] = copy.rate()
    return out


def measure(quick: bool = True) -> MachineCosts:
    """Microbenchmarks (quick: ~1-2 s once kernels are compiled). CPU: `launch_sparse_decode_attention`
    over a bf16 host pool (128 MiB read per call; 512 MiB when not quick), a one-page call for
    cpu_call_s; CUDA: `_cuda_measure` (every other field, the concurrent pair included). Without CUDA,
    or when a GPU benchmark raises (logged), only CPU_FIELDS are measured and the rest are
    `DEFAULTS`' figures; `measured` says which, `notes` why. A concurrent figure above its solo
    one (measurement noise, or a default above a measured solo figure) is lowered to it."""
    from vortex_hybrid.cpu_kernels import launch_sparse_decode_attention as cpu_attn
    cuda = torch.cuda.is_available()
    sets, cpu_bytes = _cpu_inputs((128 if quick else 512) * MIB, 4, cuda)
    call = lambda i: cpu_attn(*sets[i % len(sets)])                       # noqa: E731
    vals = {"cpu_attn_bw": cpu_bytes / _median_call(call, 4, 0.25 if quick else 1.0, 0.6 if quick else 3.0)}
    tiny = _tiny_args(sets[0][0][:1], sets[0][3][:1, :1], *sets[0][1:3])
    vals["cpu_call_s"] = _median_call(lambda i: cpu_attn(*tiny), 30, 0.05, 0.3)
    notes = [] if cuda else ["no CUDA"]
    if cuda:
        try:
            vals.update(_cuda_measure(quick, call, cpu_bytes))
        except Exception as exc:                                          # defaults, labelled so
            log.warning("GPU microbenchmarks failed, their fields are defaults: %r", exc)
            notes.append(f"GPU microbenchmarks failed: {exc!r}")
    full = {k: vals.get(k, getattr(DEFAULTS, k)) for k in NUMERIC}
    for solo, conc in PAIRS:
        if full[conc] > full[solo]:
            notes.append(f"{conc} {full[conc]:.3g} lowered to {solo}")
            full[conc] = full[solo]
    device = torch.cuda.get_device_name(0) if cuda else "none (CPU only)"
    return MachineCosts(**full, device=f"{device}; {os.cpu_count()} CPUs",
                        date=datetime.date.today().isoformat(), fingerprint=machine_fingerprint(),
                        measured=tuple(vals), notes="; ".join(notes))


# ---- the per-machine cache, and the costs each placement plans with --------------------------------
NEEDS = {"dense": (), "gpu": (),        # read no cost figure
         "offload": ("hbm_bw", "h2d_bw", "gpu_launch_s"),
         "cpu": ("hbm_bw", "cpu_attn_bw", "gpu_launch_s", "cpu_call_s"),
         "hybrid": NUMERIC}
"""Placement -> the figures its scheduling reads: `step_shape.launch_order` (each host placement,
with one host consumer in `cpu` and `offload`, so their solo rates) and, in `hybrid`, both rates
of each host consumer (the split and the subbatch share use the concurrent ones)."""
_warned: set = set()                     # (placement, defaulted fields) already logged


def cache_path() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vortex_hybrid")
    return Path(base) / "machine_costs.json"


def measurable() -> tuple:
    """The fields `measure()` takes on this machine: all with CUDA, else CPU_FIELDS."""
    return NUMERIC if torch.cuda.is_available() else CPU_FIELDS


def cached() -> MachineCosts | None:
    """This machine's costs from `cache_path()`, or None: no file, an unreadable one (logged), one
    measured on another machine, or one that lacks a figure this machine measures (`measurable()`:
    a file from before a failed measurement stopped being cached, or of unknown provenance)."""
    path = cache_path()
    if not path.exists():
        return None
    try:
        costs = MachineCosts.load(path)
    except (ValueError, OSError) as exc:                                  # JSONDecodeError is a ValueError
        log.warning("ignoring unreadable cost cache %s: %r", path, exc)
        return None
    if costs.fingerprint != machine_fingerprint():
        log.info("machine changed (%s -> %s): cost cache not used", costs.fingerprint, machine_fingerprint())
        return None
    missing = [k for k in measurable() if k not in costs.measured]
    if missing:
        log.info("cost cache %s lacks measured %s: not used", path, ", ".join(missing))
        return None
    return costs


def save_to_cache(costs: MachineCosts) -> Path:
    """Write `costs` to `cache_path()` for later runs on this machine and return the path. Only a
    complete measurement of this machine is cached: ValueError (one line, nothing written) for
    costs of another machine or lacking a figure this machine measures (a failed measurement);
    OSError when the file cannot be written."""
    if costs.fingerprint != machine_fingerprint():
        raise ValueError(f"fingerprint={costs.fingerprint!r} is not this machine's "
                         f"({machine_fingerprint()!r}): not cached")
    missing = [k for k in measurable() if k not in costs.measured]
    if missing:
        raise ValueError(f"{', '.join(missing)} not measured on this machine: not cached "
                         "(the next load_or_measure() measures again)")
    path = cache_path()
    costs.save(path)
    return path


def load_or_measure(quick: bool = True) -> MachineCosts:
    """`cached()` costs of this machine, else `measure(quick)`, cached when complete
    (`save_to_cache`; a failed measurement is not, so the next call measures again)."""
    costs = cached()
    if costs is None:
        costs = measure(quick)
        try:
            save_to_cache(costs)
        except (ValueError, OSError) as exc:
            log.warning("machine costs not cached: %s", exc)
    return costs


def costs_for(placement: str) -> MachineCosts:
    """The costs a runtime of `placement` plans with when given none: `hybrid` this machine's
    (`load_or_measure()`: the split needs the concurrent bandwidths), `cpu` and `offload` the
    cached ones if any (`cached()`) else `DEFAULTS`, `dense` and `gpu` `DEFAULTS` (they read none).
    Logs one warning per process and (placement, fields) naming the figures of NEEDS[placement]
    that were not measured on this machine."""
    if placement not in NEEDS:
        raise ValueError(f"placement={placement!r} must be one of {list(NEEDS)}")
    if placement == "hybrid":
        costs = load_or_measure()
    else:
        costs = (cached() if NEEDS[placement] else None) or DEFAULTS
    missing = tuple(k for k in NEEDS[placement] if k not in costs.measured)
    if missing and (placement, missing) not in _warned:
        _warned.add((placement, missing))
        can = [k for k in missing if k in measurable()]
        log.warning("placement %r plans with default figures (docs/hardware.md, H100) not measured "
                    "on this machine: %s%s", placement, ", ".join(missing),
                    f" (a hybrid runtime or `python -m vortex_hybrid.profile` measures "
                    f"{', '.join(can)})" if can else "")
    return costs
