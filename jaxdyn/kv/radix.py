"""The radix prefix cache: KV pages of computed token prefixes, kept for reuse (plain Python, no JAX).

A radix tree over token ids at page granularity. Every edge holds a run of
whole pages: ``key`` is its token ids (``len(pages) * page_size`` of them) and
``pages`` the KV pages holding them; a node's prefix is the concatenation of
the keys from the root. Children are indexed by the tokens of their first
page, so two children of one node never begin with the same page.

Ownership runs through the reference-counted ``PageAllocator``: the tree holds
one reference on each page it contains, and a sequence that reuses a cached
prefix takes its own reference on those pages. A page is therefore *in use*
when its count is above 1 and *evictable* when only the tree holds it. Only
whole pages are ever cached, and a cached page is never written again (a
sequence writes at positions past its cached prefix, which begin on a fresh
page), so the half-filled last page of a sequence is never shared through the
tree.

- ``match(tokens, limit)``: the longest cached prefix of ``tokens`` in whole
  pages, at most ``limit`` tokens. The node where the match ends is split
  there, so the pages a sequence reuses are always whole nodes and the rest of
  the edge stays evictable. Touches the path (LRU). Takes no references.
- ``insert(tokens, pages)``: cache a computed prefix. Pages of it already
  cached stay as they are (the caller's duplicates are not adopted); the tree
  takes a reference on each page it adopts. A running sequence whose pages
  duplicate cached ones (two prompts with a common prefix computed in the same
  step) moves onto the cached pages (``cached_pages``) and frees its copies
  (``Scheduler._share_cached_copies``): otherwise the cached ancestors of the
  pages it adopted would be held by the tree alone yet not evictable (only
  leaves are), and its copies would take memory twice.
- ``evict(n)``: free up to ``n`` pages, least recently used leaves first,
  from the tail of each leaf; an in-use page is never evicted.

Eviction runs only when the allocator is short of pages (the scheduler calls
it), so a cache that is not needed costs nothing.

A ``salt`` (vLLM's ``cache_salt``) gives a request a tree of its own: every
method takes one, and prefixes cached under a salt match only requests with
the same salt (the unsalted tree is ``root``); one pool of pages and one LRU
order for all of them. An emptied salted tree is dropped.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence as Seq

from jaxdyn.kv.allocator import PageAllocator


class _Node:
    __slots__ = ("key", "pages", "children", "parent", "last_access", "uid")

    _uids = itertools.count()

    def __init__(self, key: tuple, pages: list[int], parent: "_Node | None", last_access: int):
        self.key = key
        self.pages = pages
        self.children: dict[tuple, _Node] = {}
        self.parent = parent
        self.last_access = last_access
        self.uid = next(_Node._uids)


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int):
        self.allocator = allocator
        self.page_size = page_size
        self.root = _Node((), [], None, 0)
        self._roots: dict[str | None, _Node] = {None: self.root}    # a tree per cache salt
        self._salt_of: dict[int, str] = {}                            # a salted root's uid -> its salt
        self._clock = itertools.count(1)
        self._leaves: set[_Node] = set()
        self.num_pages = 0           # pages the tree holds
        self.num_evicted = 0         # pages evicted, ever

    # ---- lookup ----------------------------------------------------------------------------------

    def _root(self, salt: str | None, make: bool = False) -> _Node | None:
        root = self._roots.get(salt)
        if root is None and make:
            root = self._roots[salt] = _Node((), [], None, 0)
            self._salt_of[root.uid] = salt
        return root

    def _walk(self, tokens: Seq[int], limit: int, salt: str | None = None) -> tuple[_Node, list[int], int]:
        """Follow ``tokens[:limit]`` down ``salt``'s tree (made if it has none), splitting the edge where the
        match ends inside it.

        Returns (the deepest node matched, the pages of its prefix, the number of tokens matched)."""
        ps = self.page_size
        limit -= limit % ps
        node, pages, pos = self._root(salt, make=True), [], 0
        while pos < limit:
            child = node.children.get(tuple(tokens[pos:pos + ps]))
            if child is None:
                break
            key = child.key
            m = 1
            while m < len(child.pages) and pos + (m + 1) * ps <= limit and \
                    tuple(tokens[pos + m * ps:pos + (m + 1) * ps]) == key[m * ps:(m + 1) * ps]:
                m += 1
            if m < len(child.pages):
                child = self._split(child, m)
            pages.extend(child.pages)
            pos += len(child.key)
            node = child
        return node, pages, pos

    def _split(self, node: _Node, m: int) -> _Node:
        """Cut ``node``'s edge after ``m`` pages; returns the new upper node."""
        ps = self.page_size
        parent = node.parent
        mid = _Node(node.key[:m * ps], node.pages[:m], parent, node.last_access)
        parent.children[node.key[:ps]] = mid
        node.key = node.key[m * ps:]
        node.pages = node.pages[m:]
        node.parent = mid
        mid.children[node.key[:ps]] = node
        return mid

    def _touch(self, node: _Node) -> None:
        t = next(self._clock)
        while node is not None:
            node.last_access = t
            node = node.parent

    def match(self, tokens: Seq[int], limit: int | None = None, salt: str | None = None
              ) -> tuple[list[int], int]:
        """(pages, number of tokens) of the longest cached prefix of ``tokens[:limit]`` in whole pages."""
        if salt not in self._roots:
            return [], 0
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        node, pages, n = self._walk(tokens, limit, salt)
        self._touch(node)
        return pages, n

    def peek(self, tokens: Seq[int], salt: str | None = None) -> int:
        """Tokens of the longest cached prefix of ``tokens`` in whole pages; changes nothing."""
        return len(self.cached_pages(tokens, salt)) * self.page_size

    def cached_pages(self, tokens: Seq[int], salt: str | None = None) -> list[int]:
        """The pages of the longest cached prefix of ``tokens`` in whole pages; changes nothing (no split, no
        touch, no reference taken)."""
        ps = self.page_size
        limit = len(tokens) - len(tokens) % ps
        node, pos, pages = self._root(salt), 0, []
        if node is None:
            return pages
        while pos < limit:
            child = node.children.get(tuple(tokens[pos:pos + ps]))
            if child is None:
                break
            m = 1
            while m < len(child.pages) and pos + (m + 1) * ps <= limit and \
                    tuple(tokens[pos + m * ps:pos + (m + 1) * ps]) == child.key[m * ps:(m + 1) * ps]:
                m += 1
            pos += m * ps
            pages.extend(child.pages[:m])
            if m < len(child.pages):
                break
            node = child
        return pages

    # ---- insertion -------------------------------------------------------------------------------

    def insert(self, tokens: Seq[int], pages: Seq[int], salt: str | None = None) -> int:
        """Cache ``tokens`` (whole pages only: ``len(tokens) == len(pages) * page_size``) held in ``pages``, in
        ``salt``'s tree.

        Returns the number of pages the tree adopted (took a reference on)."""
        ps = self.page_size
        if len(tokens) != len(pages) * ps:
            raise ValueError(f"{len(tokens)} tokens do not fill {len(pages)} pages of {ps}")
        if not tokens:
            return 0
        node, _, pos = self._walk(tokens, len(tokens), salt)
        new = list(pages[pos // ps:])
        if new:
            self.allocator.share(new)
            self.allocator.set_cached(new, True)
            leaf = _Node(tuple(tokens[pos:]), new, node, 0)
            node.children[leaf.key[:ps]] = leaf
            self._leaves.discard(node)
            self._leaves.add(leaf)
            self.num_pages += len(new)
            node = leaf
        self._touch(node)
        return len(new)

    # ---- eviction --------------------------------------------------------------------------------

    def _evictable(self, node: _Node) -> bool:
        return bool(node.pages) and self.allocator.refcount[node.pages[-1]] == 1

    @property
    def num_evictable(self) -> int:
        """Pages held by the tree alone (what ``evict`` could free, leaf by leaf)."""
        return self.allocator.num_cache_only

    def evict(self, n: int) -> int:
        """Free up to ``n`` pages that only the tree holds, least recently used leaves first."""
        rc = self.allocator.refcount      # _evictable inlined: this scan runs over every leaf
        heap = [(leaf.last_access, leaf.uid, leaf) for leaf in self._leaves if leaf.pages and rc[leaf.pages[-1]] == 1]
        heapq.heapify(heap)
        freed = 0
        while freed < n and heap:
            _, _, leaf = heapq.heappop(heap)
            first = leaf.key[:self.page_size]
            while freed < n and leaf.pages and self.allocator.refcount[leaf.pages[-1]] == 1:
                self.allocator.free([leaf.pages.pop()])
                leaf.key = leaf.key[:-self.page_size]
                freed += 1
            if leaf.pages:
                continue          # enough freed, or the rest of this edge is in use
            parent = leaf.parent
            del parent.children[first]
            self._leaves.discard(leaf)
            if parent.parent is not None and not parent.children:
                self._leaves.add(parent)
                if self._evictable(parent):
                    heapq.heappush(heap, (parent.last_access, parent.uid, parent))
            elif parent.parent is None and parent is not self.root and not parent.children:
                del self._roots[self._salt_of.pop(parent.uid)]              # an emptied salt's tree
        self.num_pages -= freed
        self.num_evicted += freed
        return freed

    def clear(self) -> int:
        """Drop every page only the tree holds (e.g. to hand memory back); returns pages freed."""
        return self.evict(self.num_pages)

    # ---- introspection ---------------------------------------------------------------------------

    def _nodes(self):
        stack = [n for root in self._roots.values() for n in root.children.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def cached_prefixes(self) -> dict[tuple, int]:
        """Every cached page: (token prefix up to and including it) -> page id; a salted tree's prefixes start
        with ``("salt", salt)``. For tests and debugging."""
        out = {}
        stack = [(root, () if salt is None else ("salt", salt)) for salt, root in self._roots.items()]
        ps = self.page_size
        while stack:
            node, prefix = stack.pop()
            for i, p in enumerate(node.pages):
                out[prefix + node.key[:(i + 1) * ps]] = p
            for child in node.children.values():
                stack.append((child, prefix + node.key))
        return out

    def check_invariants(self) -> None:
        ps = self.page_size
        count = 0
        leaves = set()
        only = 0
        for node in self._nodes():
            assert node.pages, "an empty node in the tree"
            assert len(node.key) == len(node.pages) * ps, "a node's key does not fill its pages"
            assert node.parent.children.get(node.key[:ps]) is node, "a node is not indexed by its first page"
            for p in node.pages:
                assert self.allocator.refcount[p] >= 1, f"page {p} is in the tree but free"
                assert self.allocator.cached[p], f"page {p} is in the tree but not marked cached"
                only += self.allocator.refcount[p] == 1
            count += len(node.pages)
            if not node.children:
                leaves.add(node)
        assert count == self.num_pages, f"tree holds {count} pages, counted {self.num_pages}"
        assert leaves == self._leaves, "leaf set out of date"
        assert only == self.allocator.num_cache_only, "cache-only page count out of date"
