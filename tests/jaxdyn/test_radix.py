"""The radix prefix cache against a naive model, driven by hypothesis."""

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxdyn.kv.allocator import PageAllocator
from jaxdyn.kv.radix import RadixCache

PS = 2          # small pages, so that prefixes share and diverge often


def test_match_insert_evict_by_hand():
    alloc = PageAllocator(8)
    cache = RadixCache(alloc, 2)
    a = alloc.allocate(3)                       # tokens 1 2 | 3 4 | 5 6
    assert cache.insert([1, 2, 3, 4, 5, 6], a) == 3
    alloc.free(a)                               # the request finished: only the tree holds them
    assert cache.match([1, 2, 3, 4, 9, 9, 9]) == (a[:2], 4)
    assert cache.match([1, 2, 3, 4, 5, 6], limit=5) == (a[:2], 4)   # whole pages only
    assert cache.match([7, 7]) == ([], 0)
    b = alloc.allocate(1)                        # 1 2 | 3 4 | 8 8 diverges after two pages
    assert cache.insert([1, 2, 3, 4, 8, 8], a[:2] + b) == 1
    alloc.free(b)
    cache.check_invariants()
    # LRU: [5 6] was used before [8 8]; evicting one page takes [5 6].
    assert cache.evict(1) == 1 and alloc.refcount[a[2]] == 0
    assert cache.match([1, 2, 3, 4, 5, 6]) == (a[:2], 4)
    # In use: a sequence holds [1 2 | 3 4]; only [8 8] can go.
    pages, _ = cache.match([1, 2, 3, 4])
    alloc.share(pages)
    assert cache.evict(10) == 1
    assert cache.match([1, 2, 3, 4, 8, 8]) == (a[:2], 4)
    alloc.free(pages)
    assert cache.evict(10) == 2 and alloc.num_free == 8 and cache.num_pages == 0
    cache.check_invariants()


def test_insert_rejects_a_partial_page():
    cache = RadixCache(PageAllocator(4), 4)
    with pytest.raises(ValueError, match="do not fill"):
        cache.insert([1, 2, 3], [0])


def test_a_salted_prefix_matches_only_its_salt():
    """vLLM's cache_salt: a prefix cached under a salt is found by that salt alone (not by another, nor by a
    request without one); one LRU order over all trees, and an emptied salted tree is dropped."""
    alloc = PageAllocator(8)
    cache = RadixCache(alloc, 2)
    a, b, c = alloc.allocate(2), alloc.allocate(2), alloc.allocate(2)
    assert cache.insert([1, 2, 3, 4], a, salt="x") == 2
    assert cache.insert([1, 2, 3, 4], b) == 2                      # the same tokens unsalted: their own pages
    assert cache.insert([1, 2, 3, 4], c, salt="y") == 2
    alloc.free(a + b + c)
    assert cache.match([1, 2, 3, 4, 5], salt="x") == (a, 4)
    assert cache.match([1, 2, 3, 4, 5]) == (b, 4) and cache.match([1, 2, 3, 4, 5], salt="z") == ([], 0)
    assert cache.peek([1, 2, 3, 4], salt="y") == 4 and cache.cached_pages([1, 2], salt="y") == c[:1]
    assert cache.peek([1, 2, 3, 4], salt="z") == 0 and "z" not in cache._roots
    assert ("salt", "x", 1, 2) in cache.cached_prefixes() and (1, 2) in cache.cached_prefixes()
    cache.check_invariants()
    cache.match([1, 2, 3, 4], salt="x")                           # "x" used last: "y", then unsalted, go first
    assert cache.evict(2) == 2 and cache.match([1, 2, 3, 4], salt="y") == ([], 0)
    assert "y" not in cache._roots and cache.match([1, 2, 3, 4], salt="x") == (a, 4)
    assert cache.evict(10) == 4 and alloc.num_free == 8 and set(cache._roots) == {None}
    cache.check_invariants()


tokens = st.lists(st.integers(0, 2), min_size=1, max_size=12)
salts = st.sampled_from([None, None, "a", "b"])


def _split_key(key: tuple) -> tuple:
    """A cached_prefixes key as (salt, token prefix)."""
    return (key[1], key[2:]) if key[:1] == ("salt",) else (None, key)


class CacheMachine(RuleBasedStateMachine):
    """Sequences are admitted (reusing what the cache matches, allocating the rest), finish (their whole
    pages inserted), and the cache is asked to evict. The naive model: the content each page was written
    with (the token prefix up to its end), and who holds which page."""

    def __init__(self):
        super().__init__()
        self.alloc = PageAllocator(12)
        self.cache = RadixCache(self.alloc, PS)
        self.content: dict[int, tuple] = {}     # page -> (salt, token prefix written into it)
        self.running: list[tuple[list[int], list[int], str | None]] = []   # (tokens, pages, salt)
        self.evicted_prefixes: set[tuple] = set()

    def _make_room(self, n):
        if self.alloc.num_free < n:
            before = self.cache.cached_prefixes()
            evictable = sum(1 for p in before.values() if self.alloc.refcount[p] == 1)
            want = n - self.alloc.num_free
            freed = self.cache.evict(want)
            assert freed == min(want, evictable)
            after = self.cache.cached_prefixes()
            for prefix, page in before.items():
                if prefix not in after:
                    assert self.alloc.refcount[page] == 0, "an evicted page is still held"
                    self.evicted_prefixes.add(prefix)
            # What remains is prefix-closed (no orphaned pages below an evicted one).
            for key in after:
                salt, prefix = _split_key(key)
                assert prefix[:-PS] == () or key[:-PS] in after
        return self.alloc.can_allocate(n)

    @rule(toks=tokens, limit_back=st.integers(0, 3), salt=salts)
    def admit(self, toks, limit_back, salt):
        limit = max(0, len(toks) - limit_back)
        pages, n = self.cache.match(toks, limit, salt)
        # Naive: the longest whole-page prefix of toks[:limit] among the ones cached under the same salt.
        cached = {_split_key(k) for k in self.cache.cached_prefixes()}
        k = 0
        while (k + 1) * PS <= limit and (salt, tuple(toks[:(k + 1) * PS])) in cached:
            k += 1
        assert n == k * PS and len(pages) == k
        for i, p in enumerate(pages):
            assert self.content[p] == (salt, tuple(toks[:(i + 1) * PS])), "a matched page holds other tokens"
        self.alloc.share(pages)
        need = -(-len(toks) // PS) - len(pages)
        if not self._make_room(need):
            self.alloc.free(pages)
            return
        new = self.alloc.allocate(need)
        for i, p in enumerate(new, len(pages)):
            self.content[p] = (salt, tuple(toks[:(i + 1) * PS]))   # partial last page: its prefix so far
        self.running.append((toks, pages + new, salt))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data):
        toks, pages, salt = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        full = len(toks) // PS
        self.cache.insert(toks[:full * PS], pages[:full], salt)
        self.alloc.free(pages)

    @rule(n=st.integers(1, 6))
    def evict(self, n):
        self._make_room(self.alloc.num_free + n)

    @invariant()
    def consistent(self):
        self.alloc.check_invariants()
        self.cache.check_invariants()
        cached = self.cache.cached_prefixes()
        holders: dict[int, int] = {}
        for p in cached.values():
            holders[p] = holders.get(p, 0) + 1
        for _, pages, _ in self.running:
            for p in pages:
                holders[p] = holders.get(p, 0) + 1
        for p in range(self.alloc.num_pages):
            assert self.alloc.refcount[p] == holders.get(p, 0), f"page {p}: refcount vs holders"
        for key, p in cached.items():
            salt, prefix = _split_key(key)
            assert self.content[p] == (salt, prefix), "a cached page holds other tokens"
            assert len(prefix) % PS == 0


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
