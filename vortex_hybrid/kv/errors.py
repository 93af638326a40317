"""Errors of the paged KV substrate; each message names the request, the pages and the limit."""


class KVCacheError(RuntimeError):
    """Base class of every error the KV substrate raises."""


class OutOfPagesError(KVCacheError):
    """A pool has too few free pages; nothing was allocated and every existing page is intact."""


class PageOwnershipError(KVCacheError):
    """A request addressed a page it does not own (another request's, or a free one)."""


class UnknownRequestError(KVCacheError, KeyError, ValueError):
    """A request id that the cache never created or already freed (a `ValueError` too: a bad
    argument, as the runtime's docs say; and a `KeyError` for code that caught that)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
