"""The CPU-GPU hand-off: how a layer's CPU part joins a decode step that runs as one CUDA graph.

Per layer, the GPU writes the CPU's inputs (q, the host part of the selection) into pinned buffers
and publishes the layer's sequence number into a pinned REQUEST word; a persistent CPU worker, whose
poll is compiled (Numba, no Python per poll), sees it, calls the layer's CPU part (which reads those
inputs and writes its state into pinned output buffers), then raises DONE; the GPU waits (bounded)
on DONE before it reads the outputs. Words, codes and layout: `vortex_hybrid.handoff_words`; the
compiled CPU side: `cpu_kernels/handoff_flags.py`; the GPU kernels: `gpu_kernels/handoff_flags.py`.

Use (one channel; `channels` independent ones are served by the same worker):

    h = GraphHandoff(num_layers, [cpu_part])    # cpu_part(layer, step): inputs -> pinned outputs
    with torch.cuda.graph(g):                    # capture once; or call the same eagerly
        for layer in range(num_layers):
            ...                                  # write the CPU's inputs to the pinned buffers
            h.publish(layer)
            ...                                  # the GPU's own part of the layer
            h.wait(layer)
            ...                                  # read the CPU's state, merge
    for each step:                               # begin_step with plan(), outside the graph
        h.begin_step(); g.replay(); h.finish_step()   # finish_step synchronises the device
    h.close()

A layer whose CPU part has nothing to do need not cost a round trip: `publish(layer, need=n)` and
`wait(layer, need=n)` with `n` the number of items of the CPU part (a device scalar, written by the
GPU's work before them) write it into the layer's NEED word; with 0 the GPU does not wait and the
worker answers the layer without calling its CPU part (whose outputs the caller then ignores).
`finish_step` first waits (bounded) until the worker has served every layer published, so the next
step never begins while the worker is still behind.

Sequence numbers are `step * num_layers + layer + 1` (the device reads `step * num_layers` from a
tensor `begin_step` sets, so one graph serves every step). Faults end a step, never hang it: an
exception in the CPU part sets ERROR, the GPU's remaining waits end at once, and `finish_step`
re-raises the original exception (same object, a note names the layer); an answer that never comes
(a dead or stuck worker) ends the wait after `timeout_s` with status TIMED_OUT, the later waits
with ABANDONED, and `finish_step` raises `HandoffTimeout`. After a failed step the driver abandons
its sequence numbers (the worker passes over what it had not served) and the next step runs; while
a CPU part stays stuck, each step times out again, and a worker that died fails every later step.

`StandInHandoff` is the same protocol with the calling thread playing the GPU (compiled publish and
wait over the same words): CI tests ordering, exceptions and time-outs without a GPU.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..cpu_kernels import handoff_flags as cpu_flags
from ..handoff_words import (ABANDONED, ANSWERED, DONE, ERR_CPU, ERROR, REQUEST, ROW, SERVED,
                             STATUS_NAMES, STOP, TIMED_OUT)

log = logging.getLogger(__name__)

INTERPRETED_SPIN_S = 250e-6
"""Seconds one spin of the wait kernel takes in Triton's interpreter (measured, 2-core CPU machine)."""

CpuPart = Callable[[int, int], None]
"""A layer's CPU part: `fn(layer, step)` reads its inputs and writes its outputs (pinned buffers)."""


class HandoffError(RuntimeError):
    """A step whose hand-off failed without an exception of the CPU part to re-raise."""


class HandoffTimeout(HandoffError):
    """A GPU wait ran out of time: the worker did not answer (dead, stuck or too slow)."""


PR_SET_TIMERSLACK = 29
TIMER_SLACK_NS = 1000


def tighten_timer_slack() -> bool:
    """Linux: let this thread's sleeps overshoot by TIMER_SLACK_NS instead of the default 50 us
    (prctl PR_SET_TIMERSLACK), so a backed-off worker wakes in ~15 us rather than ~70 us (measured
    here with usleep(1)). Returns whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0) == 0
    except (OSError, AttributeError) as exc:
        log.debug("timer slack unchanged: %s", exc)
        return False


class HandoffWorker:
    """The persistent CPU thread: polls the words (compiled), calls each channel's CPU part in order,
    answers. A CPU part that raises is recorded (channel, seq, exception) and ERROR is set; the
    thread goes on with the next step. `close()` stops it.

    words: int64 [(channels + 1) * ROW] NumPy view of the pinned flags; needs: int64
    [channels x num_layers] NumPy view of the pinned NEED words (0: answer without the CPU part);
    cpu_parts: one per channel.
    """

    def __init__(self, words: np.ndarray, needs: np.ndarray, cpu_parts: Sequence[CpuPart],
                 num_layers: int, spin_us: float, max_sleep_us: int) -> None:
        self.words, self.cpu_parts, self.num_layers = words, list(cpu_parts), num_layers
        self.needs = needs
        self.spin_ns, self.max_sleep_us = int(spin_us * 1e3), max_sleep_us
        self.lock = threading.Lock()     # orders a failure's ERROR against the driver's abandon
        self._failures: list[tuple[int, int, BaseException]] = []
        self.crash: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="vortex-handoff", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def served(self, channel: int) -> int:
        """The last sequence number the worker took on `channel` (answered, failed or passed over)."""
        return int(cpu_flags.get_word(self.words, channel * ROW + SERVED))

    def take_failures(self) -> list[tuple[int, int, BaseException]]:
        """The CPU parts' exceptions since the last call, as (channel, seq, exception)."""
        with self.lock:
            out, self._failures = self._failures, []
        return out

    def _run(self) -> None:
        channels = len(self.cpu_parts)
        tighten_timer_slack()
        try:
            while True:
                channel, seq = cpu_flags.next_request(self.words, channels, self.spin_ns,
                                                      self.max_sleep_us)
                if channel < 0:
                    return
                step, layer = divmod(seq - 1, self.num_layers)
                if cpu_flags.get_word(self.needs, channel * self.num_layers + layer) == 0:
                    cpu_flags.answer(self.words, channel, seq)      # nothing to attend
                    continue
                try:
                    self.cpu_parts[channel](layer, step)
                except BaseException as exc:  # noqa: BLE001 - handed to the driver, re-raised there
                    with self.lock:
                        self._failures.append((channel, seq, exc))
                        cpu_flags.fail(self.words, channel, seq)
                else:
                    cpu_flags.answer(self.words, channel, seq)
        except BaseException as exc:  # noqa: BLE001 - the worker itself broke: end every wait now
            log.error("hand-off worker stopped: %s: %s", type(exc).__name__, exc)
            self.crash = exc
            with self.lock:
                for c in range(channels):
                    cpu_flags.set_word(self.words, c * ROW + ERROR, ERR_CPU)

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stop the thread (after the CPU part it is in, if any); returns whether it ended."""
        cpu_flags.set_word(self.words, len(self.cpu_parts) * ROW + STOP, 1)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("hand-off worker still in a CPU part after %.1f s; left running (daemon)",
                        timeout_s)
        return not self._thread.is_alive()


class Handoff:
    """The driver of the protocol, shared by `GraphHandoff` (GPU kernels) and `StandInHandoff` (CPU).

    num_layers: hand-offs per channel per step; cpu_parts: one `fn(layer, step)` per channel;
    timeout_s: bound of one wait; spin_us / max_sleep_us: the worker spins this long after an answer
    before it sleeps, with sleeps doubling up to max_sleep_us (its wake-up latency when idle).

    Each channel has steps of its own (`begin_step(channel)` ... `finish_step(channel)`): runtimes
    sharing one worker, one channel each (`runtime.micro_batches`), open, finish and fail their
    steps independently. `channel=None` means every channel at once (one step over all of them).
    """

    def __init__(self, num_layers: int, cpu_parts: Sequence[CpuPart], *, timeout_s: float,
                 spin_us: float, max_sleep_us: int, pin: bool) -> None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers={num_layers!r} must be a positive int")
        if not cpu_parts or not all(callable(f) for f in cpu_parts):
            raise ValueError(f"cpu_parts={cpu_parts!r} must be a non-empty list of callables "
                             "fn(layer, step), one per channel")
        if not timeout_s > 0 or spin_us < 0 or max_sleep_us < 1:
            raise ValueError(f"timeout_s={timeout_s!r} must be > 0, spin_us={spin_us!r} >= 0 and "
                             f"max_sleep_us={max_sleep_us!r} >= 1")
        self.num_layers, self.channels, self.timeout_s = num_layers, len(cpu_parts), timeout_s
        self.flags = torch.zeros((self.channels + 1) * ROW, dtype=torch.int64, pin_memory=pin)
        self.words = self.flags.numpy()
        self.needs = torch.full((self.channels, num_layers), -1, dtype=torch.int64, pin_memory=pin)
        """NEED words: per (channel, layer) the items of the layer's CPU part as last published
        (-1: not given)."""
        self.steps = [-1] * self.channels
        """Each channel's current (or last) step."""
        self._open = [False] * self.channels
        self._kept: list[tuple[int, int, BaseException]] = []   # other channels' failures
        cpu_flags.compile_all()
        self._spin_ns, self._max_sleep_us = int(spin_us * 1e3), max_sleep_us
        self.worker = HandoffWorker(self.words, self.needs.numpy().reshape(-1), cpu_parts,
                                    num_layers, spin_us, max_sleep_us)

    @property
    def step(self) -> int:
        """Channel 0's current (or last) step."""
        return self.steps[0]

    @property
    def in_step(self) -> bool:
        """Whether a step is open on any channel (begin_step() without its finish_step() yet)."""
        return any(self._open)

    def _channels(self, channel: Optional[int]) -> list[int]:
        if channel is None:
            return list(range(self.channels))
        if isinstance(channel, bool) or not isinstance(channel, int) or \
                not 0 <= channel < self.channels:
            raise ValueError(f"channel={channel!r} must be None (every channel) or an int in "
                             f"[0, {self.channels})")
        return [channel]

    def seq(self, layer: int, step: Optional[int] = None, channel: int = 0) -> int:
        """The sequence number of `layer` in `step` (default: `channel`'s current step)."""
        return (self.steps[channel] if step is None else step) * self.num_layers + layer + 1

    def begin_step(self, channel: Optional[int] = None) -> int:
        """Start the next step of `channel` (None: of every channel; outside any graph): its
        sequence numbers. Returns the step (channel 0's with None)."""
        chans = self._channels(channel)
        for c in chans:
            if self._open[c]:
                raise HandoffError(f"begin_step() while step {self.steps[c]} of channel {c} is "
                                   "unfinished; call finish_step() first")
        for c in chans:
            self.steps[c] += 1
            self._open[c] = True
            self._set_base(c, self.steps[c] * self.num_layers)
        return self.steps[chans[0]]

    def publish(self, layer: int, channel: int = 0, need: Optional[torch.Tensor] = None) -> None:
        """GPU side: `layer`'s inputs on `channel` are in the pinned buffers (stream-ordered).
        need: the number of items of the layer's CPU part (a 0-dim integer tensor on the device,
        read when the publish runs): 0 answers the layer without calling its CPU part."""
        self._check_layer(layer, channel)
        self._publish(layer, channel, need)

    def wait(self, layer: int, channel: int = 0, need: Optional[torch.Tensor] = None) -> None:
        """GPU side: wait (bounded) until the worker answered `layer` on `channel`; with `need`
        (the publish's) 0, no wait."""
        self._check_layer(layer, channel)
        self._wait(layer, channel, need)

    def _check_layer(self, layer: int, channel: int) -> None:
        if not 0 <= layer < self.num_layers or not 0 <= channel < self.channels:
            raise ValueError(f"layer={layer!r}, channel={channel!r} must lie in "
                             f"[0, {self.num_layers}) and [0, {self.channels})")

    def status(self) -> np.ndarray:
        """int32 [channels, num_layers]: each wait's code in the channels' current steps (0 =
        answered); synchronises with the device (every stream: the graph may run on any)."""
        raise NotImplementedError

    def _set_base(self, channel: int, base: int) -> None:
        raise NotImplementedError

    def _publish(self, layer: int, channel: int, need) -> None:
        raise NotImplementedError

    def _wait(self, layer: int, channel: int, need) -> None:
        raise NotImplementedError

    def finish_step(self, channel: Optional[int] = None) -> None:
        """End `channel`'s step (None: every channel's; after the GPU work is done: this waits for
        it): raise the CPU part's exception (the original object) or `HandoffTimeout` /
        `HandoffError` if the step failed."""
        chans = self._channels(channel)
        if not all(self._open[c] for c in chans):
            raise HandoffError("finish_step() without begin_step(): a step's sequence numbers come "
                               f"from begin_step() (channel {channel})")
        for c in chans:
            self._open[c] = False
        self.check(channel)

    def abandon_step(self, channel: Optional[int] = None) -> None:
        """End `channel`'s current step (None: every channel's) without checking it (a step being
        undone, after its GPU work is done): the worker passes over its sequence numbers it has
        not served, published or not, and its CPU parts' exceptions are dropped. No-op for a
        channel with no step open."""
        chans = [c for c in self._channels(channel) if self._open[c]]
        if not chans:
            return
        with self.worker.lock:
            for c in chans:
                self._open[c] = False
                cpu_flags.abandon(self.words, c, self.seq(self.num_layers - 1, channel=c))
        self._take_failures(chans)

    def _take_failures(self, chans: list[int]) -> list[tuple[int, int, BaseException]]:
        """The CPU parts' exceptions on `chans` since the last call; other channels' are kept for
        their own finish_step."""
        everything = self._kept + self.worker.take_failures()
        self._kept = [f for f in everything if f[0] not in chans]
        return [f for f in everything if f[0] in chans]

    def check(self, channel: Optional[int] = None) -> None:
        """Raise if `channel`'s current step failed (None: any channel's; see `finish_step`); then
        the next step can run."""
        chans = self._channels(channel)
        codes = self.status()
        late = self._drain(chans)
        failures = []
        for c, seq, exc in self._take_failures(chans):
            if self.seq(0, channel=c) <= seq <= self.seq(self.num_layers - 1, channel=c):
                failures.append((c, seq, exc))
            else:
                log.warning("CPU part of step %d layer %d (hand-off channel %d) raised after its "
                            "step ended: %s: %s", *divmod(seq - 1, self.num_layers), c,
                            type(exc).__name__, exc)
        bad = [c for c in chans if codes[c].any()]
        if not failures and not bad and not late and self.worker.crash is None:
            return
        with self.worker.lock:
            for c in chans:
                cpu_flags.abandon(self.words, c, self.seq(self.num_layers - 1, channel=c))
        if failures:
            c, seq, exc = failures[0]
            first = self.seq(0, channel=c)
            if hasattr(exc, "add_note"):
                exc.add_note(f"(in the CPU part of layer {seq - first}, step {self.steps[c]}, "
                             f"hand-off channel {c})")
            raise exc
        if self.worker.crash is not None:
            raise HandoffError(f"hand-off worker stopped in step {self.steps[chans[0]]}: "
                               f"{type(self.worker.crash).__name__}: {self.worker.crash}"
                               ) from self.worker.crash
        if not bad:
            c, seq = late[0]
            raise HandoffTimeout(
                f"hand-off of step {self.steps[c]}: the CPU worker did not serve sequence {seq} "
                f"(channel {c}, layer {(seq - 1) % self.num_layers}) within {self.timeout_s} s "
                f"of the step's end; it served through sequence {self.worker.served(c)}")
        c = bad[0]
        layer = int(np.nonzero(codes[c])[0][0])
        code = int(codes[c, layer])
        state = "running" if self.worker.alive else "not running"
        what = (f"waited {self.timeout_s} s for layer {layer}" if code == TIMED_OUT
                else f"layer {layer}: {STATUS_NAMES.get(code, code)}")
        error = HandoffTimeout if code in (TIMED_OUT, ABANDONED) else HandoffError
        raise error(f"hand-off of step {self.steps[c]} failed: {what} (channel {c}, sequence "
                    f"{self.seq(layer, channel=c)}); the CPU worker ({state}) served through "
                    f"sequence {self.worker.served(c)}")

    def _drain(self, chans: list[int]) -> list[tuple[int, int]]:
        """After the device's work: wait (bounded) until the worker has served every sequence
        number published on `chans` (layers published with need 0 were not waited for); returns
        (channel, seq) of those it did not serve in time. A failed channel (ERROR) ends at once."""
        late = []
        for c in chans:
            req = int(cpu_flags.get_word(self.words, c * ROW + REQUEST))
            if req > self.worker.served(c) and self.worker.alive:
                code = cpu_flags.await_answer(self.words, c, req, int(self.timeout_s * 1e9),
                                              self._spin_ns, self._max_sleep_us)
                if code == TIMED_OUT:
                    late.append((c, req))
        return late

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        self.worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StandInHandoff(Handoff):
    """The protocol with the calling thread as the GPU: publish and wait run at once, compiled, on
    the same words the GPU kernels use (no GPU needed). `wait` blocks this thread up to timeout_s.
    """

    def __init__(self, num_layers: int, cpu_parts: Sequence[CpuPart], *, timeout_s: float = 2.0,
                 spin_us: float = 100.0, max_sleep_us: int = 200) -> None:
        super().__init__(num_layers, cpu_parts, timeout_s=timeout_s, spin_us=spin_us,
                         max_sleep_us=max_sleep_us, pin=False)
        self._codes = np.zeros((self.channels, num_layers), dtype=np.int32)

    def _set_base(self, channel: int, base: int) -> None:
        self._codes[channel] = 0

    def _publish(self, layer: int, channel: int, need) -> None:
        n = -1 if need is None else int(need)
        cpu_flags.set_word(self.worker.needs, channel * self.num_layers + layer, n)
        cpu_flags.publish_request(self.words, channel, self.seq(layer, channel=channel))

    def _wait(self, layer: int, channel: int, need) -> None:
        if need is not None and int(need) == 0:
            self._codes[channel, layer] = ANSWERED
            return
        self._codes[channel, layer] = cpu_flags.await_answer(
            self.words, channel, self.seq(layer, channel=channel), int(self.timeout_s * 1e9),
            self._spin_ns, self._max_sleep_us)

    def status(self) -> np.ndarray:
        return self._codes.copy()


class GraphHandoff(Handoff):
    """The protocol with the GPU's kernels: `publish` and `wait` enqueue them on the current stream
    (inside a CUDA graph capture they are captured). The kernels compile here (before any capture).

    device: the CUDA device (the current one when the kernels launch), or the CPU to run the kernels
    in Triton's interpreter (TRITON_INTERPRET=1; there `max_spins` loads bound the wait, no clock).
    CPU parts must not call CUDA (the worker may run during a graph capture).
    Device tensors: `base` int64 [channels] (set by begin_step), `status_codes` int32
    [channels, num_layers] (zeroed by begin_step, written by the waits).
    """

    def __init__(self, num_layers: int, cpu_parts: Sequence[CpuPart], *,
                 device: Optional[torch.device] = None, timeout_s: float = 2.0,
                 spin_us: float = 100.0, max_sleep_us: int = 200,
                 max_spins: Optional[int] = None) -> None:
        from ..gpu_kernels import handoff_flags as gpu_flags

        device = torch.device(device) if device is not None else torch.device("cuda")
        if max_spins is None:         # the interpreter's load loop takes ~0.25 ms a spin
            max_spins = gpu_flags.MAX_SPINS if gpu_flags.clock_available(device) else \
                min(gpu_flags.MAX_SPINS, 1 + int(timeout_s / INTERPRETED_SPIN_S))
        if not 1 <= max_spins <= gpu_flags.MAX_SPINS:
            raise ValueError(f"max_spins={max_spins} must lie in [1, {gpu_flags.MAX_SPINS}]")
        self._gpu, self.device, self.max_spins = gpu_flags, device, max_spins
        super().__init__(num_layers, cpu_parts, timeout_s=timeout_s, spin_us=spin_us,
                         max_sleep_us=max_sleep_us, pin=device.type == "cuda")
        self.timeout_ns = int(timeout_s * 1e9)
        try:
            self.base = torch.zeros(self.channels, dtype=torch.int64, device=device)
            self.status_codes = torch.zeros(self.channels, num_layers, dtype=torch.int32,
                                            device=device)
            self._compile()
        except BaseException:
            self.close()
            raise

    def _compile(self) -> None:
        """Launch both kernels once on scratch words (answered in advance), so capture compiles
        nothing; the same argument types as every later launch."""
        scratch = torch.zeros(self.flags.shape, dtype=self.flags.dtype,     # pinned like the flags
                              pin_memory=self.flags.is_pinned())
        scratch_base = torch.zeros_like(self.base)
        scratch_status = torch.zeros_like(self.status_codes)
        scratch.view(-1, ROW)[:, DONE] = 1
        scratch_needs = torch.zeros(self.needs.shape, dtype=self.needs.dtype,
                                    pin_memory=self.needs.is_pinned())
        need = torch.zeros((), dtype=torch.int64, device=self.device)
        for n in (None, need):          # both variants: with and without a need scalar
            self._gpu.launch_publish(scratch, scratch_base, scratch_needs, 0, 0, n)
            self._gpu.launch_wait(scratch, scratch_base, scratch_status, 0, 0, self.timeout_ns,
                                  self.max_spins, n)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _set_base(self, channel: int, base: int) -> None:
        self.base[channel].fill_(base)
        self.status_codes[channel].zero_()

    def _publish(self, layer: int, channel: int, need) -> None:
        self._gpu.launch_publish(self.flags, self.base, self.needs, channel, layer,
                                 self._need(need))

    def _wait(self, layer: int, channel: int, need) -> None:
        self._gpu.launch_wait(self.flags, self.base, self.status_codes, channel, layer,
                              self.timeout_ns, self.max_spins, self._need(need))

    def _need(self, need) -> Optional[torch.Tensor]:
        """A need scalar as the kernels take it: int64, 0-dim, on the device (a cast is one
        capturable kernel)."""
        if need is None:
            return None
        if not isinstance(need, torch.Tensor) or need.numel() != 1 or \
                need.device.type != self.device.type or need.is_floating_point():
            raise ValueError(f"need must be a one-element integer tensor on {self.device}, got "
                             f"{need!r}")
        return need.reshape(()).to(torch.int64)

    def status(self) -> np.ndarray:
        if self.device.type == "cuda":       # whichever stream replayed the step
            torch.cuda.synchronize(self.device)
        return self.status_codes.cpu().numpy()
