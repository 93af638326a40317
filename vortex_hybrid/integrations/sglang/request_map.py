"""`RequestMap`: SGLang's request-pool rows -> the hybrid runtime's request ids.

SGLang names a running request by its row in `ReqToTokenPool` (`req_pool_idx`), and recycles rows:
a finished request's row goes to the next request that arrives. Each row also has a generation
(`ReqToTokenPool.req_generation`, bumped whenever the row is handed to a new request; a chunked
prefill keeps its row and generation across chunks). A runtime request is tied to a (row,
generation): a row whose generation changed belongs to a new request, and the old runtime request is
removed before anything reads it, so a request never sees another request's KV. Rows that SGLang
frees are reported with `freed(row)` and their runtime requests removed at the next `drop_freed()`
(between steps).

`sync(row, generation, n, read)` makes the row's runtime request hold exactly the first `n` tokens
of the SGLang request: nothing to do when it already does (a decode step), the missing tokens
appended when it holds fewer (the next prefill chunk, or a prefill whose last layer just ran), and
a fresh request from SGLang's KV pool otherwise (a new request, a prefix-cache hit, or anything the
map cannot vouch for). `read(start, end)` returns the tokens' K and V of every layer,
[num_layers, end - start, Hkv, D] each, from SGLang's KV pool.

`record` / `known_rows` keep SGLang's request ids (host strings) -> (row, generation) as batches
read them from the device, so a decode batch of known requests finds its rows on the host.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...runtime.hybrid_attention import HybridAttention

Reader = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor]"]


class RequestMap:
    """SGLang request-pool rows -> runtime request ids (module docstring)."""

    def __init__(self, runtime: HybridAttention) -> None:
        self.runtime = runtime
        self._rows: dict[int, tuple[int, int]] = {}     # row -> (runtime request id, generation)
        self._freed: list[int] = []
        self._seen: dict[str, tuple[int, int]] = {}     # SGLang request id -> (row, generation)

    def record(self, sglang_rids, rows: list[int], gens: list[int], generation) -> None:
        """Requests' rows as a batch read them from the device (`known_rows` answers from
        here); entries whose row went to another request since (`generation`, SGLang's host
        tensor of row generations) are dropped when the record grows."""
        if len(self._seen) > 4 * max(64, len(rows)):      # finished requests' entries
            self._seen = {r: (row, g) for r, (row, g) in self._seen.items()
                          if int(generation[row]) == g}
        self._seen.update(zip(sglang_rids, zip(rows, gens)))

    def known_rows(self, sglang_rids, generation):
        """(rows, generations) of requests all `record`ed, with their rows' generations
        unchanged since (no row handed to another request), else None."""
        known = [self._seen.get(r) for r in sglang_rids]
        if any(k is None for k in known):
            return None
        rows, gens = [k[0] for k in known], [k[1] for k in known]
        return (rows, gens) if generation[rows].tolist() == gens else None

    def __len__(self) -> int:
        return len(self._rows)

    def rid(self, row: int) -> int:
        return self._rows[row][0]

    def freed(self, row: int) -> None:
        """SGLang freed `row` (its request finished or was retracted); applied at `drop_freed`."""
        self._freed.append(int(row))

    def drop_freed(self) -> None:
        """Remove the runtime requests of the rows freed since the last call (between steps)."""
        freed, self._freed = self._freed, []
        for row in freed:
            self._drop(row)

    def drop(self, row: int) -> None:
        """Remove the row's runtime request now (between steps), if it has one."""
        self._drop(row)

    def holding(self, row: int, generation: int, n: int):
        """The runtime request of (row, generation) when it holds exactly `n` tokens, else None."""
        entry = self._rows.get(row)
        if entry is None or entry[1] != generation or self.runtime.kv.seq_len(entry[0]) != n:
            return None
        return entry[0]

    def _drop(self, row: int) -> None:
        entry = self._rows.pop(row, None)
        if entry is not None:
            self.runtime.remove_request(entry[0])

    def sync(self, row: int, generation: int, n: int, read: Reader) -> int:
        """The runtime request of (row, generation), holding exactly the request's first `n`
        tokens (module docstring); returns its id."""
        entry = self._rows.get(row)
        if entry is not None and entry[1] != generation:
            self._drop(row)
            entry = None
        if entry is not None:
            rid = entry[0]
            have = self.runtime.kv.seq_len(rid)
            if have == n:
                return rid
            if have < n:
                k, v = read(have, n)
                self.runtime.extend_request(rid, k, v)
                return rid
            self._drop(row)
        k, v = read(0, n)
        rid = self.runtime.add_request(k, v)
        self._rows[row] = (rid, generation)
        return rid

    def clear(self) -> None:
        for row in list(self._rows):
            self._drop(row)
        self._freed = []
