"""Shutting an `sgl.Engine` down so that another can start in the same process (the tests and
`benchmarks/sglang_e2e.py` start several, one after another). Imports neither sglang nor zmq at
import time.

SGLang 0.5.17's `Engine.shutdown()` stops the subprocesses but leaves the tokenizer manager's ZMQ
sockets (`recv_from_detokenizer`, `send_to_scheduler`, in one `zmq.asyncio.Context`) open. Once
the engine is unreachable, the cyclic garbage collector frees the tokenizer manager together with
its context and sockets, at whatever allocation triggers a full collection. If pyzmq's
`Context.__del__` runs before the sockets' own finalizers, it calls `destroy()`, which finds no
socket to close (the collector has already cleared the weak references through which the context
knows its sockets) and then `term()`, which waits for those sockets to close: forever. The
process hangs in whatever it was doing (seen: the next engine's start-up, with that engine's
scheduler process spinning idle at 100% CPU while it waits for the requests that never come).
An engine that served a request stays referenced from the event loop (its request loop's task,
its signal handlers) and lives on; one that served none is garbage as soon as it is
unreachable. The finalizers' order follows the collector's history, so the hang comes and
goes with what ran before (the real-SGLang suite hung only with some test files before
test_sglang_kv_once.py, whose engines serve no request).
"""

from __future__ import annotations

import atexit


def shut_down(engine) -> None:
    """`engine.shutdown()`, its `atexit` hook removed (it would log late, at exit), and every ZMQ
    socket of its tokenizer manager closed with linger 0, so that collecting the engine later can
    never block (module docstring)."""
    try:
        engine.shutdown()
    finally:
        atexit.unregister(engine.shutdown)
        manager = getattr(engine, "tokenizer_manager", None)
        if manager is not None:
            import zmq
            contexts = {id(s.context): s.context for s in vars(manager).values()
                        if isinstance(s, zmq.Socket)}
            for context in contexts.values():
                context.destroy(linger=0)          # closes each of its sockets, then terminates


__all__ = ["shut_down"]
