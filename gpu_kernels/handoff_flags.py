"""The GPU side of the hand-off's flag words: a publish kernel and a bounded wait kernel (Triton).

Both are single-program kernels over the flat int64 flag words (layout in
`vortex_hybrid.handoff_words`) in pinned host memory, which the GPU reads and writes through its
device mapping (UVA: the pinned tensor is passed as is). Each takes its sequence number from a
device tensor, `base[channel] + layer + 1`, so a CUDA graph that captured them serves every step:
the driver sets `base` outside the graph. Nothing is read on the host; both are capturable once
compiled (launch them once before capture).

- publish: a system-scope release exchange of the sequence number into the channel's REQUEST word
  (what the GPU wrote before it, in stream order, is visible to the CPU first); before it, the
  layer's NEED word (a second pinned array, [channels, num_layers]): the number of items the CPU
  part has, read from a device scalar, or -1 when the caller gives none. NEED 0 tells the worker to
  answer without calling the CPU part.
- wait: volatile loads of DONE and ERROR until DONE reaches the sequence number, or ERROR is set, or
  the bound passes: `timeout_ns` of the GPU's global timer (when `USE_CLOCK`) or `max_spins` loads.
  It never hangs. It writes a status code per (channel, layer) into a device int32 tensor
  (ANSWERED, CPU_FAILED, TIMED_OUT, ABANDONED) and, on its own time-out, sets ERROR = ERR_TIMEOUT so
  the step's later waits end at once. What the GPU reads after it (the CPU's outputs) is read after
  the answer. Given the layer's need scalar, a need of 0 does not wait at all (ANSWERED): the GPU
  goes on while the worker answers the empty layer in its turn.
Under TRITON_INTERPRET=1 (CPU tensors) there is no global timer: `max_spins` alone bounds the wait.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from vortex_hybrid import handoff_words as words_layout

try:
    from triton.language.extra.cuda import globaltimer
except ImportError:          # a Triton without it: the spin count alone bounds the wait
    globaltimer = None

_ROW = tl.constexpr(words_layout.ROW)
_REQUEST = tl.constexpr(words_layout.REQUEST)
_DONE = tl.constexpr(words_layout.DONE)
_ERROR = tl.constexpr(words_layout.ERROR)
_ERR_CPU = tl.constexpr(words_layout.ERR_CPU)
_ERR_TIMEOUT = tl.constexpr(words_layout.ERR_TIMEOUT)
_ANSWERED = tl.constexpr(words_layout.ANSWERED)
_CPU_FAILED = tl.constexpr(words_layout.CPU_FAILED)
_TIMED_OUT = tl.constexpr(words_layout.TIMED_OUT)
_ABANDONED = tl.constexpr(words_layout.ABANDONED)

MAX_SPINS = 2**31 - 1
"""Largest spin bound (the count is int32)."""


@triton.jit(do_not_specialize=["channel", "layer", "num_layers"])
def _publish_kernel(words, base, needs, need, channel, layer, num_layers, HAS_NEED: tl.constexpr):
    """words: int64 flag words; base: int64 [channels] on the device; needs: int64 NEED words
    [channels, num_layers] (pinned); need: int64 0-dim on the device (read when HAS_NEED)."""
    seq = tl.load(base + channel) + layer + 1
    if HAS_NEED:
        n = tl.load(need)
    else:
        n = seq * 0 - 1
    tl.store(needs + channel * num_layers + layer, n)
    tl.atomic_xchg(words + channel * _ROW + _REQUEST, seq, sem="release", scope="sys")


@triton.jit(do_not_specialize=["channel", "layer", "num_layers", "timeout_ns", "max_spins"])
def _wait_kernel(words, base, status, need, channel, layer, num_layers, timeout_ns, max_spins,
                 USE_CLOCK: tl.constexpr, HAS_NEED: tl.constexpr):
    """words: int64 flag words; base: int64 [channels]; status: int32 [channels, num_layers];
    need: int64 0-dim on the device (read when HAS_NEED: 0 means nothing to wait for)."""
    row = words + channel * _ROW
    seq = tl.load(base + channel) + layer + 1
    if HAS_NEED:
        seq = tl.where(tl.load(need) == 0, seq * 0, seq)     # DONE >= 0 always: no wait
    done = tl.load(row + _DONE, volatile=True)
    err = tl.load(row + _ERROR, volatile=True)
    spins = 0
    if USE_CLOCK:
        deadline = globaltimer() + timeout_ns
        now = globaltimer()
        while (done < seq) & (err == 0) & (spins < max_spins) & (now < deadline):
            done = tl.load(row + _DONE, volatile=True)
            err = tl.load(row + _ERROR, volatile=True)
            spins += 1
            now = globaltimer()
    else:
        while (done < seq) & (err == 0) & (spins < max_spins):
            done = tl.load(row + _DONE, volatile=True)
            err = tl.load(row + _ERROR, volatile=True)
            spins += 1
    code = tl.where(done >= seq, _ANSWERED,
                    tl.where(err == _ERR_CPU, _CPU_FAILED,
                             tl.where(err != 0, _ABANDONED, _TIMED_OUT)))
    if code == _TIMED_OUT:                   # cmp and val must be int64 like the word
        zero = err * 0
        tl.atomic_cas(row + _ERROR, zero, zero + _ERR_TIMEOUT, sem="relaxed", scope="sys")
    tl.store(status + channel * num_layers + layer, code.to(tl.int32))


def clock_available(device: torch.device) -> bool:
    """Whether the wait can bound itself by time (a CUDA device and Triton's `globaltimer`)."""
    return device.type == "cuda" and globaltimer is not None


def launch_publish(words: torch.Tensor, base: torch.Tensor, needs: torch.Tensor, channel: int,
                   layer: int, need: Optional[torch.Tensor] = None) -> None:
    """Enqueue the publish of `base[channel] + layer + 1` into `channel`'s REQUEST, after `need`
    (-1 when None) into `needs[channel, layer]` (unchecked).

    words: int64 [(channels + 1) * ROW], pinned host memory (a CPU tensor under the interpreter);
    base: int64 [channels] on the device; needs: int64 [channels, num_layers] contiguous, pinned;
    need: int64 0-dim on the device. Asynchronous on the current stream; capturable.
    """
    _publish_kernel[(1,)](words, base, needs, base if need is None else need, channel, layer,
                          needs.shape[1], HAS_NEED=need is not None, num_warps=1)


def launch_wait(words: torch.Tensor, base: torch.Tensor, status: torch.Tensor, channel: int,
                layer: int, timeout_ns: int, max_spins: int,
                need: Optional[torch.Tensor] = None) -> None:
    """Enqueue the bounded wait for `base[channel] + layer + 1` in `channel`'s DONE (unchecked);
    with `need` (int64 0-dim on the device) 0, no wait (ANSWERED).

    words, base as in `launch_publish`; status: int32 [channels, num_layers] contiguous on the
    device, `status[channel, layer]` set to the wait's code; timeout_ns: the bound in nanoseconds
    (ignored where `clock_available` is false); max_spins: the bound in loads, <= MAX_SPINS.
    Keep `timeout_ns` and `max_spins` the same across calls: their integer width is part of the
    compiled kernel, and a capture must not compile. Asynchronous on the current stream; capturable.
    """
    _wait_kernel[(1,)](words, base, status, base if need is None else need, channel, layer,
                       status.shape[1], timeout_ns, max_spins,
                       USE_CLOCK=clock_available(status.device), HAS_NEED=need is not None,
                       num_warps=1)
