"""The CPU side of the hand-off's flag words, compiled (Numba, `nogil`): the worker's poll and answers,
and the stand-in for the GPU's publish and wait that CI runs without a GPU.

Every function takes `words`, the flat int64 array of the flag rows (layout in
`vortex_hybrid.handoff_words`), a NumPy view of pinned memory the GPU reads and writes through its
device mapping. Loads of words another agent writes are atomic acquire loads and stores are atomic
release stores (LLVM atomics, so a poll is never hoisted out of its loop and a DONE is never seen
before the outputs written ahead of it, on x86 and ARM alike). Waiting spins for `spin_ns`, then
sleeps with exponential back-off up to `max_sleep_us` per sleep: no Python runs per poll.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from vortex_hybrid.handoff_words import (ABANDONED, ANSWERED, CPU_FAILED, DONE, ERR_CPU, ERR_TIMEOUT,
                                         ERROR, REQUEST, ROW, SERVED, SKIP_THROUGH, STOP, TIMED_OUT)

_CLOCK_MONOTONIC = 1          # Linux <time.h>


def _word_ptr(context, builder, signature, args):
    ary = context.make_array(signature.args[0])(context, builder, value=args[0])
    idx = context.cast(builder, args[1], signature.args[1], types.intp)
    return builder.gep(ary.data, [idx])


def _int64_words(arr, index) -> bool:
    return (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.int64
            and isinstance(index, types.Integer))


@intrinsic
def load_word(typingctx, words, index):
    """Atomic acquire load of `words[index]` (int64 1-D array)."""
    if not _int64_words(words, index):
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_word_ptr(context, builder, signature, args), "acquire", 8)

    return types.int64(words, index), codegen


@intrinsic
def store_word(typingctx, words, index, value):
    """Atomic release store of `value` into `words[index]` (int64 1-D array)."""
    if not _int64_words(words, index) or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        val = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(val, _word_ptr(context, builder, signature, args), "release", 8)
        return context.get_dummy_value()

    return types.void(words, index, value), codegen


@intrinsic
def monotonic_ns(typingctx):
    """CLOCK_MONOTONIC in nanoseconds (libc `clock_gettime`, 64-bit time_t and long)."""

    def codegen(context, builder, signature, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        timespec = ir.LiteralStructType([i64, i64])
        ts = cgutils.alloca_once(builder, timespec)
        fnty = ir.FunctionType(i32, [i32, timespec.as_pointer()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "clock_gettime")
        builder.call(fn, [i32(_CLOCK_MONOTONIC), ts])
        sec = builder.load(cgutils.gep_inbounds(builder, ts, 0, 0))
        nsec = builder.load(cgutils.gep_inbounds(builder, ts, 0, 1))
        return builder.add(builder.mul(sec, i64(1_000_000_000)), nsec)

    return types.int64(), codegen


@intrinsic
def sleep_us(typingctx, us):
    """Sleep at least `us` microseconds (libc `usleep`; the kernel's timer slack adds ~50 us)."""
    if not isinstance(us, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [i32]), "usleep")
        builder.call(fn, [context.cast(builder, args[0], signature.args[0], types.int32)])
        return context.get_dummy_value()

    return types.void(us), codegen


@njit(nogil=True, cache=True)
def next_request(words, channels, spin_ns, max_sleep_us):
    """Wait for the next sequence number to serve: returns (channel, seq), or (-1, 0) once STOP is set.

    words: int64 [(channels + 1) * ROW]. A channel whose ERROR is set is not served (its step
    failed); sequence numbers up to its SKIP_THROUGH are passed over (recorded in SERVED, not
    answered). Within a channel, sequence numbers come in order (SERVED + 1 next), even when the
    GPU published several. Across channels the lowest pending sequence number goes first (the
    lowest channel on a tie): channels whose steps advance together (micro-batches staggered by a
    layer) are served in the order their layers come, so a channel's layer l never waits behind
    another's layer l + 1.
    """
    stop = channels * ROW + STOP
    start = monotonic_ns()
    pause = 1
    while True:
        if load_word(words, stop) != 0:
            return -1, 0
        best, best_seq = -1, 0
        for c in range(channels):
            row = c * ROW
            if load_word(words, row + ERROR) != 0:
                continue
            req = load_word(words, row + REQUEST)
            served = words[row + SERVED]
            if req <= served:
                continue
            skip = load_word(words, row + SKIP_THROUGH)
            if req <= skip:
                store_word(words, row + SERVED, req)
                continue
            seq = max(served, skip) + 1
            if best < 0 or seq < best_seq:
                best, best_seq = c, seq
        if best >= 0:
            return best, best_seq
        if monotonic_ns() - start > spin_ns:
            sleep_us(pause)
            pause = min(2 * pause, max_sleep_us)


@njit(nogil=True, cache=True)
def answer(words, channel, seq):
    """The worker has written `seq`'s outputs: record it served, then raise DONE."""
    row = channel * ROW
    store_word(words, row + SERVED, seq)
    store_word(words, row + DONE, seq)


@njit(nogil=True, cache=True)
def fail(words, channel, seq):
    """The CPU part of `seq` raised: record it served and set ERROR (the GPU's waits end), unless
    the driver already abandoned `seq`'s step (then the error is stale and left unset)."""
    row = channel * ROW
    store_word(words, row + SERVED, seq)
    if seq > load_word(words, row + SKIP_THROUGH):
        store_word(words, row + ERROR, ERR_CPU)


@njit(nogil=True, cache=True)
def abandon(words, channel, skip_through):
    """Driver: the step through `skip_through` failed: pass over its sequence numbers, clear ERROR."""
    row = channel * ROW
    store_word(words, row + SKIP_THROUGH, skip_through)
    store_word(words, row + ERROR, 0)


@njit(nogil=True, cache=True)
def set_word(words, index, value):
    """Release store from Python (STOP, ERROR on a worker crash)."""
    store_word(words, index, value)


@njit(nogil=True, cache=True)
def get_word(words, index):
    """Acquire load from Python."""
    return load_word(words, index)


@njit(nogil=True, cache=True)
def publish_request(words, channel, seq):
    """Stand-in for the GPU's publish kernel: REQUEST = seq (release)."""
    store_word(words, channel * ROW + REQUEST, seq)


@njit(nogil=True, cache=True)
def await_answer(words, channel, seq, timeout_ns, spin_ns, max_sleep_us):
    """Stand-in for the GPU's wait kernel, with its status codes: ANSWERED once DONE >= seq,
    CPU_FAILED / ABANDONED when ERROR is set (ERR_CPU / ERR_TIMEOUT), else TIMED_OUT after
    `timeout_ns`, which also sets ERROR = ERR_TIMEOUT so the step's later waits end at once."""
    row = channel * ROW
    start = monotonic_ns()
    pause = 1
    while True:
        if load_word(words, row + DONE) >= seq:
            return ANSWERED
        err = load_word(words, row + ERROR)
        if err == ERR_CPU:
            return CPU_FAILED
        if err != 0:
            return ABANDONED
        waited = monotonic_ns() - start
        if waited > timeout_ns:
            if load_word(words, row + ERROR) == 0:
                store_word(words, row + ERROR, ERR_TIMEOUT)
            return TIMED_OUT
        if waited > spin_ns:
            sleep_us(pause)
            pause = min(2 * pause, max_sleep_us)


def compile_all() -> None:
    """Compile (or load from Numba's disk cache) every function here, on scratch words, so that
    neither the worker's first poll nor the stand-in's first wait pays compile time (which would
    outlast a wait's bound)."""
    words = np.zeros(2 * ROW, dtype=np.int64)
    words[ROW + STOP] = 1
    next_request(words, 1, 0, 1)                  # STOP is set: returns at once
    answer(words, 0, 1)
    fail(words, 0, 2)
    abandon(words, 0, 2)
    set_word(words, 0, get_word(words, 0))
    publish_request(words, 0, 3)
    await_answer(words, 0, 1, 0, 0, 1)
