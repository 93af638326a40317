"""Bad flows fail at definition/compile time with a message naming the op and the faulty line.

Each program marks its faulty line with `# BAD <name>`; the test finds that line in this file and
checks that the error message points at it (`test_vflow_bad_programs.py:<line>`), names the op, and
says what is wrong.
"""

from __future__ import annotations

import re

import pytest
import torch

from vortex_hybrid import vflow
from vortex_hybrid.vflow import Flow, FlowError, ops

with open(__file__, encoding="utf-8") as _fh:
    _SOURCE = _fh.read().splitlines()


def bad_line(name: str) -> str:
    """`test_vflow_bad_programs.py:N` for the line carrying `# BAD name`."""
    hits = [i + 1 for i, line in enumerate(_SOURCE) if line.rstrip().endswith(f"# BAD {name}")]
    assert len(hits) == 1, name
    return f"test_vflow_bad_programs.py:{hits[0]}"


class _Mean(Flow):
    def create_cache(self, page_size, head_dim):
        return {"mean": (1, head_dim)}

    def forward_cache(self, keys, cache):
        cache["mean"] = keys.mean(0, keepdim=True)

    def forward_indexer(self, q, cache):
        return ops.topk(ops.gemm(q, cache["mean"]).sum((-2, -1)))


class TorchOpOnCacheTensor(_Mean):
    def forward_cache(self, keys, cache):
        cache["mean"] = torch.mean(keys, 0, keepdim=True)  # BAD torch_op


class NoTopk(_Mean):
    def forward_indexer(self, q, cache):  # BAD no_topk
        return ops.gemm(q, cache["mean"]).sum((-2, -1))


class ShapeMismatch(_Mean):
    def create_cache(self, page_size, head_dim):
        return {"mean": (1, head_dim), "small": (1, 8)}

    def forward_cache(self, keys, cache):
        cache["mean"] = keys.mean(0, keepdim=True)
        cache["small"] = ops.take(keys, list(range(8)), -1).mean(0, keepdim=True)

    def forward_indexer(self, q, cache):
        return ops.topk(ops.gemm(q, cache["small"]).sum((-2, -1)))  # BAD shape


class UndeclaredSummary(_Mean):
    def forward_indexer(self, q, cache):
        return ops.topk(ops.gemm(q, cache["centroid"]).sum((-2, -1)))  # BAD undeclared


class OddPageSize(_Mean):  # BAD page_size
    pass


class NeverWritten(_Mean):
    def create_cache(self, page_size, head_dim):
        return {"mean": (1, head_dim), "kmax": (1, head_dim)}

    def forward_cache(self, keys, cache):  # BAD never_written
        cache["mean"] = keys.mean(0, keepdim=True)


class WrongSummaryShape(_Mean):
    def forward_cache(self, keys, cache):
        cache["mean"] = keys.mean(0)  # BAD summary_shape


class ArithmeticOnBool(_Mean):
    def forward_indexer(self, q, cache):
        positive = q > 0
        return ops.topk(ops.gemm(positive * q, cache["mean"]).sum((-2, -1)))  # BAD bool


class ScoreNotPerPage(_Mean):
    def forward_indexer(self, q, cache):
        return ops.topk(ops.gemm(q, cache["mean"]))  # BAD per_page


class LeakedAcrossStages(_Mean):
    def forward_cache(self, keys, cache):
        self.saved = keys.max(0)
        cache["mean"] = keys.mean(0, keepdim=True)

    def forward_indexer(self, q, cache):
        return ops.topk(ops.gemv(self.saved, cache["mean"]).sum(-1))  # BAD leaked


class PythonBranchOnTensor(_Mean):
    def forward_indexer(self, q, cache):
        score = ops.gemm(q, cache["mean"]).sum((-2, -1))
        if score > 0:  # BAD branch
            score = score * 2
        return ops.topk(score)


class IndexerOpInCache(_Mean):
    def forward_cache(self, keys, cache):
        cache["mean"] = keys.mean(0, keepdim=True) + ops.page_index()  # BAD stage


class BadDeclaration(_Mean):
    def create_cache(self, page_size, head_dim):  # BAD declaration
        return {"mean": (head_dim,)}


CASES = [
    # (program, bad-line marker, op named in the message, problem text)
    (TorchOpOnCacheTensor, "torch_op", "torch.mean", "native torch op applied to a vflow tensor"),
    (NoTopk, "no_topk", "return", "must end in `return ops.topk(score)`"),
    (ShapeMismatch, "shape", "gemm", "shape mismatch: x (2, 32) must be [M, K] and y (pages, 1, 8)"),
    (UndeclaredSummary, "undeclared", "cache['centroid']", "summary 'centroid' is used but never declared"),
    (NeverWritten, "never_written", "cache[...] =", "summaries ['kmax'] are declared in create_cache but never written"),
    (WrongSummaryShape, "summary_shape", "cache['mean'] =", "shape mismatch: value has shape (32,) but create_cache declares (1, 32)"),
    (ArithmeticOnBool, "bool", "mul", "has dtype bool"),
    (ScoreNotPerPage, "per_page", "topk", "score has shape (pages, 1, 2); topk needs one value per page"),
    (LeakedAcrossStages, "leaked", "gemv", "traced in LeakedAcrossStages.forward_cache is used in"),
    (PythonBranchOnTensor, "branch", "bool()", "use ops.where"),
    (IndexerOpInCache, "stage", "page_index", "only forward_indexer can use this op"),
    (BadDeclaration, "declaration", "return", "summary 'mean' has shape (32,); expected two positive ints"),
]


@pytest.mark.parametrize("program,marker,op,problem", CASES, ids=[c[1] for c in CASES])
def test_bad_program_is_rejected_with_its_line(program, marker, op, problem):
    with pytest.raises(FlowError) as info:
        vflow.compile_flow(program(), 16, 32, 2)
    msg = str(info.value)
    assert bad_line(marker) in msg, msg
    assert f": {op}: " in msg, msg
    assert problem in msg, msg


def test_non_power_of_two_page_size_is_rejected_with_its_line():
    with pytest.raises(FlowError) as info:
        vflow.compile_flow(OddPageSize(), 12, 32, 2)
    msg = str(info.value)
    assert bad_line("page_size") in msg and ": compile: " in msg, msg
    assert "page_size=12 is not a power of two" in msg, msg


def test_bad_flow_fails_when_registered():
    with pytest.raises(FlowError, match=re.escape(bad_line("torch_op"))):
        vflow.register("test_bad_at_definition")(TorchOpOnCacheTensor)
    assert "test_bad_at_definition" not in vflow.list_flows()


def test_flow_error_is_a_value_error_and_graphs_print():
    assert issubclass(FlowError, ValueError)
    text = str(vflow.compile_flow(_Mean(), 16, 32, 2))
    assert "graph _Mean.forward_indexer" in text and "topk(" in text and "(pages,)" in text


def test_ops_outside_tracing_are_rejected():
    with pytest.raises(FlowError, match="only run while a flow is traced"):
        ops.page_index()
