"""`FlowError`, raised when a flow cannot be compiled, and the lookup of the user's source line.

Every message reads `path/to/flow.py:LINE: flow.stage: op: what is wrong and how to fix it`, where
LINE is the line of the flow's code that called the op (frames inside vflow's own machinery and
inside torch are skipped; the library flows under `vflow/flows/` count as user code).
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Callable, Optional

import torch

_VFLOW_DIR = os.path.dirname(os.path.abspath(__file__))
_FLOWS_DIR = os.path.join(_VFLOW_DIR, "flows")
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


class FlowError(ValueError):
    """A flow that is not a valid program (bad shape, dtype, summary name, op or output)."""


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path.startswith(_FLOWS_DIR + os.sep):
        return False
    return path.startswith(_VFLOW_DIR + os.sep) or path.startswith(_TORCH_DIR + os.sep)


def user_location() -> str:
    """`file:line` of the innermost frame outside vflow's machinery and torch."""
    frame = sys._getframe(1)
    while frame is not None:
        if not _internal(frame.f_code.co_filename):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>:0"


def definition_location(fn: Callable) -> str:
    """`file:line` where a function or class is defined (for errors found after tracing)."""
    target = getattr(fn, "__func__", fn)
    try:
        _, line = inspect.getsourcelines(target)
        return f"{inspect.getsourcefile(target)}:{line}"
    except (OSError, TypeError):
        pass
    if isinstance(target, type):       # a class whose module is not importable: its first method
        funcs = [f for f in vars(target).values() if hasattr(f, "__code__")]
        target = min(funcs, key=lambda f: f.__code__.co_firstlineno) if funcs else None
    code = getattr(target, "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code else "<unknown>:0"


def flow_error(context: str, op: str, problem: str, where: Optional[str] = None) -> FlowError:
    """Build the error: `where: context: op: problem` (where defaults to the user's line)."""
    return FlowError(f"{where or user_location()}: {context}: {op}: {problem}")
