"""`PageAllocator`: hands out physical page indices of one pool with per-request ownership."""

from __future__ import annotations

from typing import Iterable

from .errors import OutOfPagesError, PageOwnershipError

FREE = -1


class PageAllocator:
    """Free-list allocator over pages `0..num_pages-1`; every used page has exactly one owner.

    `alloc` is all-or-nothing: when too few pages are free it raises `OutOfPagesError` and changes
    nothing. `free` refuses (and changes nothing) if any page is not owned by the caller.
    """

    def __init__(self, num_pages: int, name: str = "pool") -> None:
        if not isinstance(num_pages, int) or num_pages < 0:
            raise ValueError(f"num_pages={num_pages!r} must be a non-negative integer")
        self.name = name
        self.num_pages = num_pages
        self._owner = [FREE] * num_pages
        # Pop from the end: low page indices are handed out first.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def owner_of(self, page: int) -> int:
        """The owning request id of `page`, or -1 when free."""
        return self._owner[page]

    def alloc(self, owner: int, n: int) -> list[int]:
        """Give `n` free pages to `owner`; raises OutOfPagesError (changing nothing) if short."""
        if owner < 0:
            raise ValueError(f"owner={owner} must be a request id >= 0")
        if n < 0:
            raise ValueError(f"cannot allocate n={n} pages")
        if n > len(self._free):
            raise OutOfPagesError(
                f"{self.name}: request {owner} needs {n} pages but only {len(self._free)} of "
                f"{self.num_pages} are free; free finished requests, offload pages, or size the "
                f"pool larger")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._owner[p] = owner
        return pages

    def check_owned(self, owner: int, pages: Iterable[int]) -> None:
        """Raise PageOwnershipError unless every page is in range and owned by `owner`."""
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise PageOwnershipError(f"{self.name}: page {p} is outside 0..{self.num_pages - 1}")
            if self._owner[p] != owner:
                holder = "nobody (free)" if self._owner[p] == FREE else f"request {self._owner[p]}"
                raise PageOwnershipError(
                    f"{self.name}: request {owner} addressed page {p}, which belongs to {holder}")

    def free(self, owner: int, pages: Iterable[int]) -> None:
        """Return `pages` of `owner` to the free list; refuses all of them if any is not owned."""
        pages = list(pages)
        if len(set(pages)) != len(pages):
            raise PageOwnershipError(f"{self.name}: request {owner} freed a page twice in {pages}")
        self.check_owned(owner, pages)
        for p in pages:
            self._owner[p] = FREE
            self._free.append(p)

    def pages_of(self, owner: int) -> list[int]:
        """Every page `owner` holds, ascending (a scan: for tests and diagnostics)."""
        return [p for p, o in enumerate(self._owner) if o == owner]
