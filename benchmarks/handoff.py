"""Benchmark: the CPU-GPU hand-off's round trip per layer inside one CUDA graph.

Question: what does one layer's hand-off (GPU publishes, the CPU worker answers, the GPU waits)
cost inside a captured decode step, with the compiled poller of `runtime/handoff.py` (ours) against
a Python poller over the same words (the peer: the probe in shared/runtime measured 52 us per layer
with one) and against the same graph without hand-offs?

One graph of N layers (default 32), each layer an elementwise GPU kernel over --work-elems floats
("work"), then per mode:
  - none: the work alone (the floor);
  - compiled: publish + wait, answered by GraphHandoff's compiled worker (a CPU part that does
    nothing);
  - python: publish + wait, answered by a Python thread polling the same words (`time.sleep(0)`
    between polls, as the probe's);
  - compiled+payload: a D2H copy of --payload-kib into a pinned input buffer, publish + wait (the CPU
    part copies input to a pinned output), an H2D copy back: the data a layer's CPU part moves
    (checked equal after the run).
A replay's wall time includes begin_step (two small launches) and the synchronisation; per layer
= (mode - none) / N. Medians and p90 over --replays replays after 3 warm-up replays, one mode at a
time (its poller alone on the CPU). Every mode with
a hand-off checks that every layer was answered (status all zero). A last row, on any machine, is
the CPU stand-in (`StandInHandoff`: a Python thread calls the compiled publish and wait, the
compiled worker answers): a CPU-to-CPU round trip of the same words, no GPU.

    python3 benchmarks/handoff.py [--layers 32] [--replays 50] [--out DIR]   # GPU machine, ~1 min
    python3 benchmarks/handoff.py --smoke          # tiny sizes; without CUDA: the stand-in row only

JSON goes to DIR/handoff.json (DIR defaults to $OUT, else the current directory); the table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import threading
import time

import numba
import numpy as np
import torch

from vortex_hybrid.handoff_words import DONE, REQUEST
from vortex_hybrid.runtime.handoff import GraphHandoff, StandInHandoff


def summarise(times_s: list[float]) -> dict:
    ts = sorted(times_s)
    return {"median_ms": statistics.median(ts) * 1e3, "p90_ms": ts[int(0.9 * (len(ts) - 1))] * 1e3}


def python_poller(words: np.ndarray, stop: threading.Event) -> None:
    """The peer: answers every published sequence number from Python."""
    while not stop.is_set():
        req = int(words[REQUEST])
        if req > int(words[DONE]):
            words[DONE] = req
        else:
            time.sleep(0)


class Step:
    """One graph of `layers` layers for a mode; `run()` replays it once, returns seconds."""

    def __init__(self, mode: str, args) -> None:
        self.mode, self.layers = mode, args.layers
        self.x = torch.zeros(args.work_elems, device="cuda")
        n = args.payload_kib * 256
        self.src = torch.randn(args.layers, n, device="cuda")
        self.dst = torch.zeros_like(self.src)
        self.inp = torch.zeros(args.layers, n, pin_memory=True)
        self.out = torch.zeros(args.layers, n, pin_memory=True)
        inp_np, out_np = self.inp.numpy(), self.out.numpy()

        def cpu_part(layer: int, step: int) -> None:
            if mode == "compiled+payload":
                out_np[layer] = inp_np[layer]

        self.h = None if mode == "none" else GraphHandoff(args.layers, [cpu_part],
                                                           spin_us=args.spin_us)
        self.stop = threading.Event()
        if mode == "python":
            self.h.worker.close()
            threading.Thread(target=python_poller, args=(self.h.words, self.stop), daemon=True).start()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for layer in range(args.layers):
                self.x.mul_(1.0001)
                if mode == "compiled+payload":
                    self.inp[layer].copy_(self.src[layer], non_blocking=True)
                if self.h is not None:
                    self.h.publish(layer)
                    self.h.wait(layer)
                if mode == "compiled+payload":
                    self.dst[layer].copy_(self.out[layer], non_blocking=True)

    def run(self) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        if self.h is not None:
            self.h.begin_step()
        self.graph.replay()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if self.h is not None:
            self.h.finish_step()               # raises if any layer was not answered
        return elapsed

    def close(self) -> dict:
        checks = {}
        if self.mode == "compiled+payload":
            checks["payload_equal"] = bool(torch.equal(self.dst, self.src))
        if self.h is not None:
            checks["answered"] = int(self.h.words[DONE])
            self.stop.set()
            self.h.close()
        return checks


def gpu_rows(args) -> list[dict]:
    """One mode at a time (a mode's poller never runs beside another's): build, warm, time, close."""
    rows = []
    for mode in ("none", "compiled", "python", "compiled+payload"):
        step = Step(mode, args)
        for _ in range(3):
            step.run()
        times = [step.run() for _ in range(args.replays)]
        rows.append({"mode": mode, "layers": args.layers, **summarise(times), **step.close()})
    floor = rows[0]["median_ms"]
    for row in rows:
        row["per_layer_us"] = (row["median_ms"] - floor) / args.layers * 1e3
    return rows


def stand_in_row(args) -> dict:
    with StandInHandoff(args.layers, [lambda layer, step: None], spin_us=args.spin_us) as h:
        times = []
        for r in range(args.replays + 3):
            h.begin_step()
            start = time.perf_counter()
            for layer in range(args.layers):
                h.publish(layer)
                h.wait(layer)
            elapsed = time.perf_counter() - start
            h.finish_step()
            if r >= 3:
                times.append(elapsed)
        row = {"mode": "cpu stand-in", "layers": args.layers, **summarise(times),
               "answered": int(h.words[DONE])}
    row["per_layer_us"] = statistics.median(times) / args.layers * 1e6
    return row


def table(rows: list[dict]) -> str:
    lines = ["| mode | layers | per layer us | ms/step (median) | p90 ms | checks |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        checks = ", ".join(f"{k}={r[k]}" for k in ("answered", "payload_equal") if k in r) or "-"
        lines.append(f"| {r['mode']} | {r['layers']} | {r['per_layer_us']:.1f} | "
                     f"{r['median_ms']:.3f} | {r['p90_ms']:.3f} | {checks} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32, help="layers (hand-offs) per graph")
    ap.add_argument("--replays", type=int, default=50, help="timed replays per mode")
    ap.add_argument("--work-elems", type=int, default=1 << 20,
                    help="floats the per-layer GPU work kernel scales")
    ap.add_argument("--payload-kib", type=int, default=256,
                    help="KiB copied to and from pinned buffers per layer in compiled+payload "
                         "(256: q of 16 requests x 32 heads x 128 float32)")
    ap.add_argument("--spin-us", type=float, default=200.0,
                    help="how long the worker spins after an answer before it sleeps")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (4 layers, 5 replays)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for handoff.json")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.replays, args.work_elems, args.payload_kib = 4, 5, 1 << 12, 4
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA device: measuring the CPU stand-in only (the GPU modes need a GPU)")
    rows = gpu_rows(args) if cuda else []
    rows.append(stand_in_row(args))
    result = {"date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name() if cuda else "cpu only",
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "numba": numba.__version__,
              "args": vars(args), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "handoff.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    print(table(rows))


if __name__ == "__main__":
    main()
