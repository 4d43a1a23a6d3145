"""Reference-counted allocator of KV pages (plain Python, no JAX).

A page id is free when its count is 0. ``allocate`` hands out pages with count
1; ``share`` adds a reference (``n > 1`` samples of one prompt, later the radix
prefix cache); ``free`` drops one reference per page and returns pages whose
count reaches 0 to the free list. A page with more than one reference is
read-only: a writer first takes a private copy (copy-on-write), which the
scheduler arranges with ``fork_for_write``.
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
            self.refcount[p] += 1

    def free(self, pages: Iterable[int]) -> None:
        for p in pages:
            c = self.refcount[p]
            if c <= 0:
                raise ValueError(f"page {p} freed twice")
            self.refcount[p] = c - 1
            if c == 1:
                self._free.append(p)

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
