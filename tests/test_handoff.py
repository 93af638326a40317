"""The CPU-GPU hand-off protocol (vortex_hybrid/runtime/handoff.py).

On any machine: the CPU stand-in (`StandInHandoff`: the test thread plays the GPU with compiled
publish and wait over the same flag words, the compiled worker answers): per-layer ordering over
steps, exceptions of the CPU part re-raised with their type, lost answers timing out, the worker
surviving failures, shutdown. Without CUDA, the Triton kernels themselves run in the interpreter on
CPU tensors. With CUDA (skipped here): publish and wait inside one captured CUDA graph, replayed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from vortex_hybrid.handoff_words import (ABANDONED, ANSWERED, CPU_FAILED, DONE, ERR_TIMEOUT, ERROR,
                                         REQUEST, ROW, TIMED_OUT)
from vortex_hybrid.runtime import handoff as handoff_module
from vortex_hybrid.runtime.handoff import (GraphHandoff, HandoffError, HandoffTimeout,
                                           StandInHandoff)

CUDA = torch.cuda.is_available()
TIMEOUT_S = 0.2


class CpuPartFailed(Exception):
    """An exception type the tests raise in a CPU part (and nothing else raises)."""


class Doubler:
    """A CPU part over pinned-style buffers: out[layer] = 2 * in[layer] + step; records each call
    with the REQUEST and DONE words it saw."""

    def __init__(self, num_layers: int, width: int = 4, pin: bool = False, fail_at=None,
                 stall_at=None) -> None:
        self.inp = torch.zeros(num_layers, width, pin_memory=pin)
        self.out = torch.zeros(num_layers, width, pin_memory=pin)
        self.inp_np, self.out_np = self.inp.numpy(), self.out.numpy()
        self.calls: list[tuple[int, int, int, int]] = []
        self.fail_at, self.stall_at = fail_at, stall_at
        self.resumed = threading.Event()      # set when a stalled call returns
        self.words = None                     # set once the driver exists

    def __call__(self, layer: int, step: int) -> None:
        w = self.words
        self.calls.append((step, layer, int(w[REQUEST]), int(w[DONE])))
        if (step, layer) == self.fail_at:
            raise CpuPartFailed(f"layer {layer} of step {step} broke")
        if (step, layer) == self.stall_at:
            time.sleep(3 * TIMEOUT_S)
            self.resumed.set()
        self.out_np[layer] = 2 * self.inp_np[layer] + step


def stand_in(num_layers: int, **kw) -> tuple[StandInHandoff, Doubler]:
    part = Doubler(num_layers, **kw)
    h = StandInHandoff(num_layers, [part], timeout_s=TIMEOUT_S)
    part.words = h.words
    return h, part


def run_step(h, part: Doubler, rng: np.random.Generator, pipelined: bool = False) -> np.ndarray:
    """The GPU's side of one step: per layer write the input, publish, wait, read the output."""
    step = h.begin_step()
    x = rng.standard_normal(part.inp.shape).astype(np.float32)
    y = np.full_like(x, np.nan)
    for layer in range(h.num_layers):
        part.inp_np[layer] = x[layer]
        h.publish(layer)
        if not pipelined:
            h.wait(layer)
            y[layer] = part.out_np[layer]
    if pipelined:
        for layer in range(h.num_layers):
            h.wait(layer)
            y[layer] = part.out_np[layer]
    return x, y, step


@pytest.mark.parametrize("pipelined", [False, True])
def test_layers_are_answered_in_order_after_their_publish_over_steps(pipelined):
    L, steps = 7, 6
    h, part = stand_in(L)
    rng = np.random.default_rng(0)
    with h:
        for _ in range(steps):
            x, y, step = run_step(h, part, rng, pipelined)
            h.finish_step()
            np.testing.assert_array_equal(y, 2 * x + step)
            assert not h.status().any()
    assert [c[:2] for c in part.calls] == [(s, l) for s in range(steps) for l in range(L)]
    seqs = [s * L + l + 1 for s in range(steps) for l in range(L)]
    for (step, layer, request, done), seq in zip(part.calls, seqs):
        assert request >= seq, f"layer {layer} of step {step} served before it was published"
        assert done == seq - 1, f"layer {layer} of step {step} served before the one before it"
    assert h.worker.served(0) == steps * L and int(h.words[DONE]) == steps * L
    requests = [c[2] for c in part.calls]
    assert requests == sorted(requests) and requests[-1] == steps * L


def test_channels_are_served_independently():
    L = 3
    parts = [Doubler(L), Doubler(L)]
    h = StandInHandoff(L, parts, timeout_s=TIMEOUT_S)
    for c, p in enumerate(parts):
        p.words = h.words[c * ROW:]
    with h:
        for step in range(3):
            h.begin_step()
            for layer in range(L):
                for c, p in enumerate(parts):
                    p.inp_np[layer] = 10 * c + layer + step
                    h.publish(layer, channel=c)
            for layer in range(L):
                for c in (1, 0):
                    h.wait(layer, channel=c)
            h.finish_step()
            for c, p in enumerate(parts):
                np.testing.assert_array_equal(p.out_np[:, 0], [2 * (10 * c + l + step) + step
                                                               for l in range(L)])
    for p in parts:
        assert [c[:2] for c in p.calls] == [(s, l) for s in range(3) for l in range(L)]


def test_layers_with_nothing_to_do_skip_the_cpu_part_and_the_wait():
    """need 0: the worker answers the layer without calling its CPU part and the wait returns at
    once, even while the worker is still busy with an earlier layer; finish_step waits until the
    worker served every layer, so the next step starts clean. need > 0 and no need behave as
    before."""
    L, steps = 6, 4
    part = Doubler(L, stall_at=(1, 0))           # step 1: layer 0's CPU part sleeps 3 x TIMEOUT_S
    h = StandInHandoff(L, [part], timeout_s=10 * TIMEOUT_S)     # which its wait outlasts
    part.words = h.words
    rng = np.random.default_rng(11)
    needs = [1, 0, None, 0, 0, 2]                # layers 1, 3, 4: nothing for the CPU
    with h:
        for _ in range(steps):
            step = h.begin_step()
            x = rng.standard_normal(part.inp.shape).astype(np.float32)
            for layer, n in enumerate(needs):
                part.inp_np[layer] = x[layer]
                h.publish(layer, need=None if n is None else torch.tensor(n))
            start = time.perf_counter()
            for layer in (1, 3, 4):              # published after a stalled layer 0 in step 1
                h.wait(layer, need=torch.tensor(0))
            assert time.perf_counter() - start < TIMEOUT_S / 2
            for layer in (0, 2, 5):
                h.wait(layer, need=None if needs[layer] is None else torch.tensor(needs[layer]))
            h.finish_step()
            assert not h.status().any()
            assert h.worker.served(0) == (step + 1) * L == int(h.words[DONE])
            for layer in (0, 2, 5):
                np.testing.assert_array_equal(part.out_np[layer], 2 * x[layer] + step)
            assert h.needs[0].tolist() == [1, 0, -1, 0, 0, 2]
    assert [c[:2] for c in part.calls] == [(s, l) for s in range(steps) for l in (0, 2, 5)]


def test_finish_step_reports_a_worker_that_does_not_serve_a_skipped_layer():
    """A layer published with need 0 is not waited for; if the worker does not serve it in time
    (here: stuck in the CPU part of a layer nobody waited for), finish_step times out instead of
    letting the next step begin over it, and the step after that runs."""
    L = 2
    h, part = stand_in(L, stall_at=(0, 0))
    with h:
        h.begin_step()
        h.publish(0, need=torch.tensor(1))       # no wait for it: the GPU's side moved on
        h.publish(1, need=torch.tensor(0))
        h.wait(1, need=torch.tensor(0))
        assert not h.status().any()
        with pytest.raises(HandoffTimeout, match="did not serve sequence 2"):
            h.finish_step()
        assert part.resumed.wait(5.0)
        x, y, step = run_step(h, part, np.random.default_rng(13))
        h.finish_step()
        np.testing.assert_array_equal(y, 2 * x + step)


def test_cpu_part_exception_surfaces_with_its_type_and_message():
    L = 5
    h, part = stand_in(L, fail_at=(1, 2))
    rng = np.random.default_rng(1)
    with h:
        run_step(h, part, rng)
        h.finish_step()
        run_step(h, part, rng)
        codes = h.status()
        with pytest.raises(CpuPartFailed, match="layer 2 of step 1 broke") as info:
            h.finish_step()
    assert codes.tolist() == [[ANSWERED, ANSWERED, CPU_FAILED, CPU_FAILED, CPU_FAILED]]
    assert any("layer 2, step 1" in n for n in info.value.__notes__)
    assert [c[:2] for c in part.calls] == [(0, l) for l in range(L)] + [(1, 0), (1, 1), (1, 2)]


def test_worker_survives_a_failed_call_and_serves_the_next_step():
    L = 4
    h, part = stand_in(L, fail_at=(0, 1))
    rng = np.random.default_rng(2)
    with h:
        run_step(h, part, rng)
        with pytest.raises(CpuPartFailed):
            h.finish_step()
        for _ in range(2):
            x, y, step = run_step(h, part, rng)
            h.finish_step()
            np.testing.assert_array_equal(y, 2 * x + step)
        assert h.worker.alive
    assert [c[:2] for c in part.calls][2:] == [(s, l) for s in (1, 2) for l in range(L)]


def test_lost_answer_times_out_instead_of_hanging():
    L = 6
    h, part = stand_in(L)
    rng = np.random.default_rng(3)
    with h:
        run_step(h, part, rng)
        h.finish_step()
        assert h.worker.close() and not h.worker.alive          # nobody answers any more
        start = time.perf_counter()
        run_step(h, part, rng)
        elapsed = time.perf_counter() - start
        codes = h.status()
        with pytest.raises(HandoffTimeout, match=r"layer 0 .*not running"):
            h.finish_step()
    assert codes.tolist() == [[TIMED_OUT] + [ABANDONED] * (L - 1)]
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.0, f"{L} waits took {elapsed:.2f} s"


def test_a_stuck_cpu_part_times_out_and_the_next_step_runs():
    L = 4
    h, part = stand_in(L, stall_at=(0, 2))
    rng = np.random.default_rng(4)
    with h:
        run_step(h, part, rng)
        assert h.status().tolist() == [[ANSWERED, ANSWERED, TIMED_OUT, ABANDONED]]
        with pytest.raises(HandoffTimeout, match="layer 2"):
            h.finish_step()
        assert part.resumed.wait(5.0)
        x, y, step = run_step(h, part, rng)
        h.finish_step()
        np.testing.assert_array_equal(y, 2 * x + step)
    assert [c[:2] for c in part.calls] == [(0, 0), (0, 1), (0, 2)] + [(1, l) for l in range(L)]


def test_a_broken_worker_ends_the_waits_at_once_and_the_step_says_why(monkeypatch):
    L = 3
    h, part = stand_in(L)

    def broken_answer(words, channel, seq):
        raise RuntimeError("answer path broke")

    monkeypatch.setattr(handoff_module.cpu_flags, "answer", broken_answer)
    rng = np.random.default_rng(5)
    with h:
        run_step(h, part, rng)
        codes = h.status()
        with pytest.raises(HandoffError, match="worker stopped.*answer path broke"):
            h.finish_step()
        assert not h.worker.alive
    assert codes.tolist() == [[CPU_FAILED] * L], "the waits timed out instead of ending at once"


def test_shutdown_is_clean_and_idempotent():
    h, part = stand_in(2)
    run_step(h, part, np.random.default_rng(6))
    h.finish_step()
    start = time.perf_counter()
    h.close()
    assert not h.worker.alive and time.perf_counter() - start < 1.0
    h.close()
    assert not h.worker.alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl timer slack is Linux's")
def test_worker_thread_sleeps_with_a_tight_timer_slack():
    import ctypes

    slack = []
    libc = ctypes.CDLL(None)
    with StandInHandoff(1, [lambda layer, step: slack.append(libc.prctl(30, 0, 0, 0, 0))]) as h:
        h.begin_step()
        h.publish(0)
        h.wait(0)
        h.finish_step()
    assert slack == [handoff_module.TIMER_SLACK_NS]          # PR_GET_TIMERSLACK in the worker


def test_bad_arguments_and_step_misuse_are_refused():
    with pytest.raises(ValueError, match="num_layers=0"):
        StandInHandoff(0, [lambda layer, step: None])
    with pytest.raises(ValueError, match="cpu_parts"):
        StandInHandoff(2, [])
    with pytest.raises(ValueError, match="timeout_s=0"):
        StandInHandoff(2, [lambda layer, step: None], timeout_s=0)
    with StandInHandoff(2, [lambda layer, step: None]) as h:
        with pytest.raises(HandoffError, match="without begin_step"):
            h.finish_step()
        h.begin_step()
        with pytest.raises(ValueError, match="layer=2"):
            h.publish(2)
        with pytest.raises(ValueError, match="channel=1"):
            h.wait(0, channel=1)
        with pytest.raises(HandoffError, match="unfinished"):
            h.begin_step()


# The Triton kernels in Triton's interpreter (CPU tensors), where there is no GPU.

interpreter_only = pytest.mark.skipif(CUDA, reason="the interpreter runs where there is no GPU; "
                                                   "the graph tests below run the kernels natively")


@interpreter_only
def test_interpreted_kernels_publish_and_wait_each_layer():
    L = 3
    part = Doubler(L, fail_at=(1, 1))
    h = GraphHandoff(L, [part], device="cpu", timeout_s=TIMEOUT_S)
    part.words = h.words
    rng = np.random.default_rng(7)
    with h:
        x, y, step = run_step(h, part, rng)
        h.finish_step()
        np.testing.assert_array_equal(y, 2 * x + step)
        assert int(h.words[REQUEST]) == L and int(h.words[DONE]) == L
        run_step(h, part, rng)
        assert h.status().tolist() == [[ANSWERED, CPU_FAILED, CPU_FAILED]]
        with pytest.raises(CpuPartFailed):
            h.finish_step()
        x, y, step = run_step(h, part, rng)
        h.finish_step()
        np.testing.assert_array_equal(y, 2 * x + step)
        assert int(h.words[REQUEST]) == 3 * L


@interpreter_only
def test_interpreted_kernels_skip_layers_with_nothing_to_do():
    """The kernels with a need scalar: the publish writes it into the layer's NEED word (-1
    without one), the wait with need 0 returns ANSWERED at once even with no worker to answer."""
    L = 3
    part = Doubler(L)
    h = GraphHandoff(L, [part], device="cpu", timeout_s=TIMEOUT_S, max_spins=40)
    part.words = h.words
    rng = np.random.default_rng(9)
    needs = [torch.tensor(4), torch.tensor(0), None]
    with h:
        step = h.begin_step()
        x = rng.standard_normal(part.inp.shape).astype(np.float32)
        for layer, n in enumerate(needs):
            part.inp_np[layer] = x[layer]
            h.publish(layer, need=n)
            h.wait(layer, need=n)
        h.finish_step()
        assert h.needs[0].tolist() == [4, 0, -1]
        assert [c[:2] for c in part.calls] == [(step, 0), (step, 2)]
        np.testing.assert_array_equal(part.out_np[[0, 2]], 2 * x[[0, 2]] + step)
        h.worker.close()                   # nobody answers now: need 0 still does not wait
        h.begin_step()
        h.publish(0, need=torch.tensor(0))
        h.wait(0, need=torch.tensor(0))
        h.publish(1, need=torch.tensor(3))
        h.wait(1, need=torch.tensor(3))
        assert h.status().tolist()[0][:2] == [ANSWERED, TIMED_OUT]
        with pytest.raises(ValueError, match="one-element integer tensor"):
            h.publish(2, need=torch.tensor(1.0))


@interpreter_only
def test_interpreted_wait_times_out_and_abandons_the_later_layers():
    L = 3
    part = Doubler(L)
    with pytest.raises(ValueError, match="max_spins=0"):
        GraphHandoff(L, [part], device="cpu", max_spins=0)
    h = GraphHandoff(L, [part], device="cpu", timeout_s=TIMEOUT_S, max_spins=40)
    part.words = h.words
    with h:
        h.worker.close()
        run_step(h, part, np.random.default_rng(8))
        assert h.status().tolist() == [[TIMED_OUT, ABANDONED, ABANDONED]]
        assert int(h.words[ERROR]) == ERR_TIMEOUT
        with pytest.raises(HandoffTimeout, match="layer 0"):
            h.finish_step()
        assert int(h.words[ERROR]) == 0


AHEAD_OF_TIME = """
import importlib.util, pathlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.find_spec("vortex_hybrid.gpu_kernels")
path = pathlib.Path(spec.submodule_search_locations[0]) / "handoff_flags.py"
spec = importlib.util.spec_from_file_location("handoff_flags", path)
g = importlib.util.module_from_spec(spec)
spec.loader.exec_module(g)
target = GPUTarget("cuda", 90, 32)
ints = dict(channel="i32", layer="i32", num_layers="i32")
for has_need in (True, False):
    sig = dict(words="*i64", base="*i64", needs="*i64", need="*i64", HAS_NEED="constexpr", **ints)
    publish = triton.compile(ASTSource(g._publish_kernel, sig,
                                       constexprs=dict(HAS_NEED=has_need)),
                             target=target, options=dict(num_warps=1))
    assert "atom.global.sys.release.exch.b64" in publish.asm["ptx"]
    for clock in (True, False):
        sig = dict(words="*i64", base="*i64", status="*i32", need="*i64", timeout_ns="i64",
                   max_spins="i32", USE_CLOCK="constexpr", HAS_NEED="constexpr", **ints)
        wait = triton.compile(ASTSource(g._wait_kernel, sig,
                                        constexprs=dict(USE_CLOCK=clock, HAS_NEED=has_need)),
                              target=target, options=dict(num_warps=1))
        ptx = wait.asm["ptx"]
        assert "ld.volatile.global.b64" in ptx and "atom.global.relaxed.sys.cas.b64" in ptx
        assert ("%globaltimer" in ptx) == clock
print("compiled")
"""


@interpreter_only
def test_gpu_kernels_compile_for_sm90_without_a_gpu():
    """Triton compiles for a target without a device: the interpreter is lax about types (an int32
    compare-and-swap value on an int64 word runs there, and fails to compile for a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", AHEAD_OF_TIME], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


# Natively on a GPU: publish and wait inside one captured CUDA graph.

gpu_only = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")


def graph_setup(num_layers: int, need=None, **kw):
    """A graph of num_layers layers: copy x[l] to the pinned input, publish, wait, copy the pinned
    output to y[l]; with `need` (int64 [num_layers] on the GPU) each layer's publish and wait take
    need[l]. Returns (handoff, part, graph, x, y)."""
    part = Doubler(num_layers, width=64, pin=True, **kw)
    h = GraphHandoff(num_layers, [part], timeout_s=TIMEOUT_S)
    part.words = h.words
    x = torch.zeros(num_layers, 64, device="cuda")
    y = torch.zeros(num_layers, 64, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for layer in range(num_layers):
            part.inp[layer].copy_(x[layer], non_blocking=True)
            n = None if need is None else need[layer]
            h.publish(layer, need=n)
            h.wait(layer, need=n)
            y[layer].copy_(part.out[layer], non_blocking=True)
    return h, part, g, x, y


def replay(h, g, x, y):
    x.copy_(torch.randn_like(x))
    y.fill_(float("nan"))
    step = h.begin_step()
    g.replay()
    torch.cuda.synchronize()
    return step


@gpu_only
def test_graph_replays_hand_off_every_layer():
    L = 8
    h, part, g, x, y = graph_setup(L)
    with h:
        for _ in range(5):
            step = replay(h, g, x, y)
            h.finish_step()
            torch.testing.assert_close(y, 2 * x + step, rtol=0, atol=0)
            assert not h.status().any()
    assert [c[:2] for c in part.calls] == [(s, l) for s in range(5) for l in range(L)]
    assert h.worker.served(0) == 5 * L


@gpu_only
def test_graph_skips_layers_with_nothing_to_do():
    """Inside one captured graph, layers whose need (a device tensor the replay reads) is 0 call no
    CPU part and do not wait; the others are answered as before, over several replays with
    different needs."""
    L = 6
    need = torch.zeros(L, dtype=torch.int64, device="cuda")
    h, part, g, x, y = graph_setup(L, need)
    rng = np.random.default_rng(12)
    with h:
        for _ in range(4):
            want = torch.as_tensor(rng.integers(0, 2, L))
            need.copy_(want)
            calls = len(part.calls)
            step = replay(h, g, x, y)
            h.finish_step()
            busy = want.bool()
            torch.testing.assert_close(y[busy.cuda()], (2 * x + step)[busy.cuda()], rtol=0, atol=0)
            assert [c[:2] for c in part.calls[calls:]] == \
                [(step, int(l)) for l in torch.nonzero(busy).flatten()]
            assert h.needs[0].tolist() == want.tolist()


@gpu_only
def test_graph_timeout_reports_through_the_status_tensor():
    L = 8
    h, part, g, x, y = graph_setup(L, stall_at=(1, 3), fail_at=(3, 5))
    with h:
        replay(h, g, x, y)
        h.finish_step()
        start = time.perf_counter()
        replay(h, g, x, y)
        elapsed = time.perf_counter() - start
        assert h.status_codes.cpu().tolist() == [[ANSWERED] * 3 + [TIMED_OUT] + [ABANDONED] * 4]
        with pytest.raises(HandoffTimeout, match="layer 3"):
            h.finish_step()
        assert elapsed < TIMEOUT_S + 1.0
        assert part.resumed.wait(5.0)
        step = replay(h, g, x, y)
        h.finish_step()
        torch.testing.assert_close(y, 2 * x + step, rtol=0, atol=0)
        replay(h, g, x, y)
        with pytest.raises(CpuPartFailed, match="layer 5 of step 3"):
            h.finish_step()
        assert h.status_codes.cpu().tolist() == [[ANSWERED] * 5 + [CPU_FAILED] * 3]
        step = replay(h, g, x, y)
        h.finish_step()
        torch.testing.assert_close(y, 2 * x + step, rtol=0, atol=0)


def test_threads_left_behind_are_only_closed_workers():
    """Every driver above was closed: no hand-off thread is left running."""
    assert not [t for t in threading.enumerate() if t.name == "vortex-handoff" and t.is_alive()]
