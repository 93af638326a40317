"""Machine costs: the bandwidths and fixed per-call costs the runtime's scheduling reads.

`MachineCosts` (bytes/s, seconds): hbm_bw (device copy, read + write bytes), h2d_bw (pinned host ->
GPU alone), cpu_attn_bw (CPU sparse attention alone, KV bytes read), cpu_attn_bw_concurrent /
h2d_bw_concurrent (each while the other runs: host DRAM is one budget, docs/hardware.md),
gpu_launch_s (host time of one eager GPU call), cpu_call_s (fixed time of one CPU kernel call).
`measure()` takes them on this machine (GPU fields: docs/hardware.md `DEFAULTS` without CUDA);
`load_or_measure()` caches them per machine. Their readers: `step_shape.launch_order` (every host
placement) and, in `hybrid`, the page-by-page split (`HybridAttention._hybrid_fetch`) and the
subbatch share (`HybridAttention._cpu_row_share`).
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
GPU_FIELDS = ("hbm_bw", "h2d_bw", "h2d_bw_concurrent", "gpu_launch_s")
PAIRS = (("cpu_attn_bw", "cpu_attn_bw_concurrent"), ("h2d_bw", "h2d_bw_concurrent"))  # solo, concurrent
SOURCES = ("measured", "default", "file")
CACHE_ENV = "VORTEX_HYBRID_CACHE"
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class MachineCosts:
    """Bandwidths in bytes/s, fixed per-call costs in seconds, and where they came from."""
    hbm_bw: float
    h2d_bw: float
    cpu_attn_bw: float
    cpu_attn_bw_concurrent: float
    h2d_bw_concurrent: float
    gpu_launch_s: float
    cpu_call_s: float
    source: str = "default"        # "measured", "default" or "file"
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
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r} must be one of {SOURCES}")
        bad = [n for n in ("device", "date", "fingerprint", "notes") if not isinstance(getattr(self, n), str)]
        if bad:
            raise ValueError(f"{bad[0]}={getattr(self, bad[0])!r} must be a string")
        if not isinstance(self.measured, (tuple, list)) or not all(m in NUMERIC for m in self.measured):
            raise ValueError(f"measured={self.measured!r} must list fields of {NUMERIC}")
        object.__setattr__(self, "measured", tuple(self.measured))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["measured"] = list(self.measured)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MachineCosts":
        if not isinstance(d, dict):
            raise ValueError(f"machine costs must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = [k for k in d if k not in known], [k for k in NUMERIC if k not in d]
        if unknown or missing:
            raise ValueError(f"machine costs: unknown fields {unknown}, missing fields {missing}")
        return cls(**d)

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
    hbm_bw=3000e9, h2d_bw=55e9, cpu_attn_bw=52e9, cpu_attn_bw_concurrent=21e9, h2d_bw_concurrent=54e9,
    gpu_launch_s=120e-6, cpu_call_s=50e-6, source="default", device="NVIDIA H100 80GB HBM3 (docs)",
    notes="docs/hardware.md survey figures of the H100 machine; gpu_launch_s from the 72-174 us "
          "eager-launch range; cpu_call_s assumed (not in hardware.md)")


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


def _cuda_measure(quick: bool, h2d_src: torch.Tensor, cpu_call, cpu_bytes: int) -> dict:
    """HBM copy, pinned H2D alone, host time of an eager GPU attention call, and CPU attention while a
    background thread keeps pinned H2D copies running (both concurrent rates)."""
    n = (256 if quick else 1024) * MIB
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
    chunks, stream, stop, spans = h2d_src.split(64 * MIB), torch.cuda.Stream(), threading.Event(), []
    errors = []

    def copier():
        # Its own destination, made in this thread: inference mode is thread-local, and a tensor
        # made under the caller's inference mode cannot be written here outside it.
        try:
            with torch.cuda.stream(stream):
                dst = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
                while not stop.is_set():
                    src = chunks[len(spans) % len(chunks)]
                    t0 = time.perf_counter()
                    dst[:src.numel()].copy_(src, non_blocking=True)
                    stream.synchronize()
                    spans.append((t0, time.perf_counter(), src.numel()))
        except Exception as exc:                                          # reported below
            errors.append(exc)

    th = threading.Thread(target=copier, daemon=True)
    th.start()
    while not spans and th.is_alive():
        time.sleep(1e-4)
    w0 = time.perf_counter()
    sec = _median_call(cpu_call, 3, 0.2 if quick else 1.0, 0.6 if quick else 3.0)
    w1 = time.perf_counter()
    stop.set()
    th.join()
    if errors or not spans:
        raise RuntimeError(f"the concurrent copy thread failed: {errors[0] if errors else 'no copy'}")
    inside = [s for s in spans if s[0] >= w0 and s[1] <= w1] or spans
    out["cpu_attn_bw_concurrent"] = cpu_bytes / sec
    out["h2d_bw_concurrent"] = sum(s[2] for s in inside) / sum(s[1] - s[0] for s in inside)
    return out


def measure(quick: bool = True) -> MachineCosts:
    """Microbenchmarks (quick: ~1-2 s once kernels are compiled). CPU: `launch_sparse_decode_attention`
    over a bf16 host pool (128 MiB read per call; 512 MiB when not quick), a one-page call for
    cpu_call_s; CUDA: `_cuda_measure`. Without CUDA (or when a GPU benchmark fails) GPU fields are
    `DEFAULTS`, cpu_attn_bw_concurrent = cpu_attn_bw * the H100 concurrent/solo ratio; `measured` and
    `notes` say which. A concurrent figure above its solo one (noise) is clamped to it."""
    from vortex_hybrid.cpu_kernels import launch_sparse_decode_attention as cpu_attn
    cuda = torch.cuda.is_available()
    sets, cpu_bytes = _cpu_inputs((128 if quick else 512) * MIB, 4, cuda)
    call = lambda i: cpu_attn(*sets[i % len(sets)])                       # noqa: E731
    vals = {"cpu_attn_bw": cpu_bytes / _median_call(call, 4, 0.25 if quick else 1.0, 0.6 if quick else 3.0)}
    tiny = _tiny_args(sets[0][0][:1], sets[0][3][:1, :1], *sets[0][1:3])
    vals["cpu_call_s"] = _median_call(lambda i: cpu_attn(*tiny), 30, 0.05, 0.3)
    notes = []
    if cuda:
        try:
            h2d_src = torch.empty((256 if quick else 1024) * MIB, dtype=torch.uint8, pin_memory=True)
            vals.update(_cuda_measure(quick, h2d_src.fill_(1), call, cpu_bytes))
        except Exception as exc:                                          # keep the defaults, say so
            log.warning("GPU microbenchmarks failed, GPU fields keep defaults: %r", exc)
            notes.append(f"GPU microbenchmarks failed: {exc!r}")
            vals = {k: vals[k] for k in ("cpu_attn_bw", "cpu_call_s")}
    measured = tuple(k for k in NUMERIC if k in vals)
    ratio = DEFAULTS.cpu_attn_bw_concurrent / DEFAULTS.cpu_attn_bw
    if "cpu_attn_bw_concurrent" not in vals:
        vals["cpu_attn_bw_concurrent"] = vals["cpu_attn_bw"] * ratio
        notes.append(f"cpu_attn_bw_concurrent = cpu_attn_bw * {ratio:.3f} (H100 ratio, not measured)")
    full = {k: vals.get(k, getattr(DEFAULTS, k)) for k in NUMERIC}
    for solo, conc in PAIRS:
        if full[conc] > full[solo]:
            notes.append(f"{conc} {full[conc]:.3g} clamped to {solo}")
            full[conc] = full[solo]
    if len(measured) < len(NUMERIC):
        notes.append("defaults (docs/hardware.md, H100): " + ", ".join(k for k in NUMERIC if k not in measured))
    device = torch.cuda.get_device_name(0) if cuda else "none (CPU only)"
    return MachineCosts(**full, source="measured", device=f"{device}; {os.cpu_count()} CPUs",
                        date=datetime.date.today().isoformat(), fingerprint=machine_fingerprint(),
                        measured=measured, notes="; ".join(notes))


def cache_path() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vortex_hybrid")
    return Path(base) / "machine_costs.json"


def load_or_measure(path=None, quick: bool = True) -> MachineCosts:
    """Costs from `path` when given (source "file"; errors propagate); else the cached measurement
    when its fingerprint matches this machine; else `measure(quick)`, written to `cache_path()`."""
    if path is not None:
        return dataclasses.replace(MachineCosts.load(path), source="file")
    cached = cache_path()
    if cached.exists():
        try:
            costs = MachineCosts.load(cached)
            if costs.fingerprint == machine_fingerprint():
                return costs
            log.info("machine changed (%s -> %s): re-measuring", costs.fingerprint, machine_fingerprint())
        except (ValueError, OSError) as exc:                              # JSONDecodeError is a ValueError
            log.warning("ignoring unreadable cost cache %s: %r", cached, exc)
    costs = measure(quick)
    try:
        costs.save(cached)
    except OSError as exc:
        log.warning("could not write cost cache %s: %r", cached, exc)
    return costs
