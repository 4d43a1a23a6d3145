"""Reference-counted allocator of KV pages (plain Python, no JAX).

A page id is free when its count is 0. ``allocate`` hands out pages with count
1; ``share`` adds a reference (``n > 1`` samples of one prompt, later the radix
prefix cache); ``free`` drops one reference per page and returns pages whose
count reaches 0 to the free list. A page with more than one reference is
read-only: a writer first takes a private copy (copy-on-write), which the
scheduler arranges with ``fork_for_write``.

Pages the prefix cache holds are marked ``cached``; ``num_cache_only`` counts
those that nothing else holds (reclaimable on demand), kept up to date in O(1)
as references come and go.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class OutOfPages(Exception):
    """Not enough free pages; nothing was allocated."""


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError("num_pages must be at least 1")
        self.num_pages = num_pages
        self.refcount = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))
        self.cached = [False] * num_pages
        self.num_cache_only = 0          # cached pages with no other holder

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self.refcount[p] = 1
        return pages

    def share(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self.refcount[p] <= 0:
                raise ValueError(f"page {p} is free; cannot share it")
            if self.cached[p] and self.refcount[p] == 1:
                self.num_cache_only -= 1
            self.refcount[p] += 1

    def free(self, pages: Iterable[int]) -> None:
        for p in pages:
            c = self.refcount[p]
            if c <= 0:
                raise ValueError(f"page {p} freed twice")
            self.refcount[p] = c - 1
            if self.cached[p] and c <= 2:
                self.num_cache_only += 1 if c == 2 else -1
            if c == 1:
                self.cached[p] = False
                self._free.append(p)

    def set_cached(self, pages: Iterable[int], cached: bool) -> None:
        """Mark pages as held by the prefix cache (the cache holds its own reference on each)."""
        for p in pages:
            if self.cached[p] != cached and self.refcount[p] == 1:
                self.num_cache_only += 1 if cached else -1
            self.cached[p] = cached

    @property
    def num_in_use(self) -> int:
        """Pages held by sequences (not counting those only the prefix cache holds)."""
        return self.num_pages - len(self._free) - self.num_cache_only

    def is_shared(self, page: int) -> bool:
        return self.refcount[page] > 1

    def fork_for_write(self, page: int) -> int:
        """A private copy's page id for a writer of shared ``page`` (drops its reference to it).

        The caller copies the page's contents on the device before writing.
        """
        new = self.allocate(1)[0]
        self.free([page])
        return new

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        for p, c in enumerate(self.refcount):
            assert c >= 0, f"page {p} has negative count"
            assert (c == 0) == (p in free), f"page {p}: count {c} but free={p in free}"
            assert not (c == 0 and self.cached[p]), f"page {p} is free but marked cached"
        only = sum(1 for p, c in enumerate(self.refcount) if c == 1 and self.cached[p])
        assert only == self.num_cache_only, f"{self.num_cache_only} cache-only pages counted, {only} found"
