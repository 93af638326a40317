"""The paged KV substrate: page pools, the page allocator and the per-request paged KV cache."""

from .errors import KVCacheError, OutOfPagesError, PageOwnershipError, UnknownRequestError
from .page_allocator import PageAllocator
from .page_pool import PagePool, pool_bytes
from .paged_kv_cache import NOT_RESIDENT, Checkpoint, PagedKVCache

__all__ = ["KVCacheError", "OutOfPagesError", "PageOwnershipError", "UnknownRequestError",
           "PageAllocator", "PagePool", "pool_bytes", "NOT_RESIDENT", "Checkpoint", "PagedKVCache"]
