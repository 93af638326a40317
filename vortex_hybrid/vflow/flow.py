"""`Flow`: the base class of a sparse-attention algorithm (a vFlow program).

A flow has three parts, each ordinary Python that is traced once per shape into the IR:

    create_cache(page_size, head_dim) -> {name: (r, c)}   summaries kept per page and KV head
                                          (or Codes(r, c, bits): integer codes stored packed)
    forward_cache(keys, cache)          keys (page_size, D) of one full page; cache[name] = value
    forward_indexer(q, cache)           q (G, D), cache[name] (pages, r, c); return ops.topk(score)

`@vflow.register("name")` makes it loadable by name (and checks it at once); see docs/vflow.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

if TYPE_CHECKING:
    from .compiler import CompiledFlow
    from .vtensor import Selection, VTensor


class Codes(NamedTuple):
    """A summary declaration (in `create_cache`) for integer codes: shape (r, c), each value an
    integer in [0, 2**bits - 1] (bits 1-8), stored packed in `bits` bits a value
    (`vortex_hybrid.packed_codes`) instead of a float. The flow computes and reads it as floats;
    the value written is rounded to the nearest integer and clamped to that range when stored."""

    r: int
    c: int
    bits: int


class Flow:
    """Base class of flows. Subclasses override `create_cache`, `forward_cache`, `forward_indexer`.

    Constructor arguments are the flow's options (e.g. `channels=16`); every option needs a default
    so that `register` can build the flow and check it with `probe_shape`.
    """

    name: Optional[str] = None
    """Registered name (set by `register`); lowerings are looked up by it."""
    probe_shape: tuple[int, int, int] = (16, 64, 4)
    """(page_size, head_dim, query heads per KV head) that `register` traces the flow with."""
    compiled: Callable[[int, int, int], "CompiledFlow"]
    """`flow.compiled(page_size, head_dim, group)`: the flow traced and checked for these shapes,
    traced once per shape and cached on the object. Attached by `compiler` (see compile_flow)."""

    def create_cache(self, page_size: int, head_dim: int) -> dict[str, tuple[int, int]]:
        """Summaries this flow keeps: name -> (r, c), the shape per page and KV head, or
        `Codes(r, c, bits)` for integer codes stored packed."""
        return {}

    def forward_cache(self, keys: "VTensor", cache: Any) -> None:
        """Write every declared summary of one full page: `cache[name] = value` of shape (r, c)."""

    def forward_indexer(self, q: "VTensor", cache: Any) -> "Selection":
        """Score the pages from the query heads `q` (G, D) and `cache`; return `ops.topk(score)`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<flow {self.name or type(self).__name__}>"
