"""The scheduler and the page allocator on their own: plain Python, no device."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from jaxdyn.engine.request import Request, Sequence, SeqStatus
from jaxdyn.engine.sampling_params import SamplingParams
from jaxdyn.engine.scheduler import Scheduler, SchedulerConfig
from jaxdyn.kv.allocator import OutOfPages, PageAllocator
from jaxdyn.kv.radix import RadixCache


def test_allocator_counts_and_copy_on_write():
    a = PageAllocator(4)
    p = a.allocate(2)
    a.share(p)
    assert a.refcount[p[0]] == 2 and a.num_free == 2
    new = a.fork_for_write(p[1])
    assert new not in p and a.refcount[p[1]] == 1 and a.refcount[new] == 1
    a.free(p)
    a.free([p[0]])
    a.free([new])
    assert a.num_free == 4
    with pytest.raises(ValueError, match="freed twice"):
        a.free([p[0]])
    with pytest.raises(OutOfPages):
        a.allocate(5)
    assert a.num_free == 4
    a.check_invariants()


class Sim:
    """The scheduler driven as the engine drives it, with tokens 'drawn' at once."""

    def __init__(self, pages=12, budget=16, cap=4, page_size=4, seed=0, cache=False, policy="fcfs"):
        self.alloc = PageAllocator(pages)
        self.cache = RadixCache(self.alloc, page_size) if cache else None
        self.s = Scheduler(SchedulerConfig(budget, cap, page_size, policy=policy), self.alloc, self.cache)
        self.content = {}          # (page, offset) -> token id written there
        self.page_size, self.pages = page_size, pages
        self.reqs, self.arrivals, self.rng = {}, 0, random.Random(seed)

    def add(self, rid, prompt_len, max_tokens, n=1, priority=0, first=0):
        req = Request(rid, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens, n=n), priority)
        req.max_len = prompt_len + max_tokens
        assert -(-req.max_len // self.page_size) <= self.pages
        for i in range(n):
            req.seqs.append(Sequence(req, i, 0, self.arrivals))
        self.arrivals += 1
        if n > 1 and prompt_len > 1:
            req.seqs[0].fork_target = prompt_len - 1
            for s in req.seqs[1:]:
                s.blocked = True
        self.reqs[rid] = req
        self.s.add(req)

    def step(self):
        out = self.s.schedule(lambda q: q.num_tokens < q.request.max_len)
        for src, dst in out.copies:              # copy-on-write, as the runner does before the step
            for off in range(self.page_size):
                if (src, off) in self.content:
                    self.content[dst, off] = self.content[src, off]
        cfg = self.s.config
        assert out.num_tokens <= cfg.max_num_batched_tokens and len(out.items) <= cfg.max_num_seqs
        for it in out.items:
            seq = it.seq
            assert len(seq.pages) * self.page_size >= it.start + it.num_tokens
            end = it.start + it.num_tokens
            ps = self.page_size
            for pos in range(it.start):          # what the chunk attends to holds its tokens
                assert self.content[seq.pages[pos // ps], pos % ps] == seq.token_slice(pos, pos + 1)[0]
            for pos in range(it.start, end):     # a page written is private, or shared with
                page = seq.pages[pos // self.page_size]       # siblings forked at this chunk's end
                self.content[page, pos % ps] = seq.token_slice(pos, pos + 1)[0]
                if self.alloc.refcount[page] - self.alloc.cached[page] > 1:
                    sharers = [q for q in self.s.running if page in q.pages and q is not seq]
                    assert sharers and all(q.request is seq.request and q.num_computed == end
                                           for q in sharers)
            if it.samples:
                seq.output_ids.append(self.rng.randrange(100))
                if seq.num_known >= seq.request.max_len:
                    self.s.finish(seq)
                    seq.finish_reason = "length"
        if self.cache is not None:                # a cached page holds the tokens of its prefix
            for prefix, page in self.cache.cached_prefixes().items():
                for off in range(self.page_size):
                    assert self.content[page, off] == prefix[off - self.page_size], "a cached page is overwritten"
        for rid in [r for r, q in self.reqs.items() if q.finished]:
            del self.reqs[rid]
        self.s.check_invariants()
        return out

    def abort(self, rid):
        for seq in self.reqs.pop(rid).seqs:
            if not seq.finished:
                self.s.finish(seq)
        self.s.check_invariants()


def test_decode_comes_first_and_a_long_prompt_is_chunked():
    sim = Sim(pages=64, budget=8, cap=4, page_size=4)
    sim.add("short", 2, 30)
    sim.step()                               # prefill of "short" (and its first token)
    sim.add("huge", 120, 2)
    steps_with_decode = 0
    while "huge" in sim.reqs and not sim.reqs["huge"].seqs[0].output_ids:
        out = sim.step()
        kinds = [(it.seq.request.request_id, it.num_tokens) for it in out.items]
        assert kinds[0] == ("short", 1), kinds            # the decode token goes first every step
        assert sum(n for _, n in kinds) <= 8
        steps_with_decode += 1
    assert steps_with_decode >= 120 // 7


def test_preemption_takes_the_most_recently_admitted_and_it_recovers():
    sim = Sim(pages=6, budget=32, cap=4, page_size=4)
    for i in range(3):
        sim.add(f"r{i}", 4, 8)                 # each needs up to 3 pages; 3 x 3 > 6
    preempted = []
    for _ in range(200):
        if not sim.reqs:
            break
        preempted += [q.request.request_id for q in sim.step().preempted]
    assert not sim.reqs and sim.alloc.num_free == 6
    assert preempted and preempted[0] == "r2"


def test_priority_orders_admission():
    sim = Sim(pages=64, budget=4, cap=1, page_size=4)
    sim.add("low", 4, 1, priority=5)
    sim.add("high", 4, 1, priority=-1)
    first = sim.step().items[0].seq.request.request_id
    assert first == "high"


def test_preemption_takes_the_lowest_priority_running_sequence():
    """A high-priority request admitted after a low-priority one: when pages run out, the low-priority sequence is
    preempted (it was scheduled first in the step, so it was no candidate: the high one preempted itself and waited
    for the low one to finish), and the high one runs to its end undisturbed."""
    sim = Sim(pages=6, budget=32, cap=4, page_size=4)
    sim.add("low", 2, 20, priority=10)
    sim.step()
    sim.add("high", 4, 16, priority=0)
    preempted, steps = [], []
    for _ in range(80):
        if not sim.reqs:
            break
        out = sim.step()
        preempted += [q.request.request_id for q in out.preempted]
        steps.append({it.seq.request.request_id for it in out.items})
    assert not sim.reqs and sim.alloc.num_free == 6
    assert preempted == ["low"]
    last_high = max(k for k, ids in enumerate(steps) if "high" in ids)
    assert all("high" in ids for ids in steps[:last_high + 1])      # never held back until it was done
    assert all(ids == {"low"} for ids in steps[last_high + 1:])


def test_a_preemption_skips_no_running_sequence():
    """A victim sitting before the sequence that needed the pages (in running order) no longer shifts the list under
    the loop: the next running sequence is scheduled in the same step (it was skipped for a step)."""
    s = Scheduler(SchedulerConfig(64, 8, 4), PageAllocator(3))
    can = lambda q: q.num_tokens < q.request.max_len

    def add(rid, plen, mt, prio, order):
        r = Request(rid, list(range(order * 10, order * 10 + plen)), SamplingParams(max_tokens=mt), prio)
        r.max_len = plen + mt
        r.seqs.append(Sequence(r, 0, 0, order))
        s.add(r)
        return r.seqs[0]

    low = add("L", 3, 2, 10, 0)
    s.schedule(can)
    low.output_ids.append(1)
    add("H1", 4, 8, 0, 1), add("H2", 3, 8, 0, 2)
    for it in s.schedule(can).items:      # L's token, H1's and H2's prompts: drawn, not yet read back
        it.seq.num_pending += 1
    out = s.schedule(can)
    assert [q.request.request_id for q in out.preempted] == ["L"]
    assert sorted(it.seq.request.request_id for it in out.items) == ["H1", "H2"]
    s.check_invariants()


@pytest.mark.parametrize("policy", ["fcfs", "lof"])
def test_longest_output_first_admits_by_max_tokens_after_priority(policy):
    """"lof" (SGLang's longest output first): waiting requests of equal priority are admitted largest max_tokens
    first, ties by arrival; priority still comes first. "fcfs" admits by arrival."""
    sim = Sim(pages=256, budget=4, cap=1, page_size=4, policy=policy)
    for rid, max_tokens, priority in (("a", 3, 0), ("b", 30, 0), ("c", 9, 0), ("d", 30, 0), ("e", 1, -1)):
        sim.add(rid, 4, max_tokens, priority=priority)
    admitted = []
    while sim.reqs:
        for it in sim.step().items:
            if it.start == 0:
                admitted.append(it.seq.request.request_id)
    assert admitted == (["e", "b", "d", "c", "a"] if policy == "lof" else ["e", "a", "b", "c", "d"])


def test_schedule_policy_is_checked():
    with pytest.raises(ValueError, match="schedule_policy: expected one of fcfs, lof"):
        SchedulerConfig(16, 4, 4, policy="sjf")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "abort"]),
                          st.integers(1, 40), st.integers(1, 20), st.integers(1, 3), st.integers(0, 2)),
                min_size=1, max_size=60),
       st.integers(6, 20), st.integers(1, 24), st.integers(1, 5))
@pytest.mark.parametrize("cache", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_random_workloads_never_leak_crash_or_deadlock(cache, ops, pages, budget, cap):
    sim = Sim(pages=pages, budget=budget, cap=cap, page_size=4, cache=cache)
    k = 0
    for op, plen, mt, n, prio in ops:
        if op == "add":
            if -(-(plen + mt) // 4) <= pages:
                sim.add(f"q{k}", plen, mt, n=n, priority=prio)
                k += 1
        elif op == "abort" and sim.reqs:
            sim.abort(sorted(sim.reqs)[plen % len(sim.reqs)])
        else:
            sim.step()
    for _ in range(5000):                      # everything finishes: no deadlock
        if not sim.reqs:
            break
        sim.step()
    assert not sim.reqs and not sim.s.has_unfinished()
    assert sim.alloc.num_in_use == 0
    if cache:
        sim.cache.clear()
    assert sim.alloc.num_free == pages


def test_a_finished_prompt_is_reused_in_whole_pages_and_one_token_is_always_computed():
    sim = Sim(pages=32, budget=64, cap=4, page_size=4, cache=True)
    sim.add("a", 10, 3)                       # 10 prompt tokens: 2 whole pages, then 2 more
    while sim.reqs:
        sim.step()
    sim.add("b", 12, 2)                       # shares the first 10 prompt tokens with "a"
    first = sim.step().items[0]
    # a's 12 computed tokens: prompt 0..9 then outputs; b matches 0..7 (whole pages of the shared part).
    assert (first.start, first.num_tokens) == (8, 4)
    assert sim.reqs["b"].num_cached_tokens == 8
    while sim.reqs:
        sim.step()
    sim.add("c", 8, 2)                        # a prompt of exactly two cached pages: the last page is
    first = sim.step().items[0]               # recomputed, so the logits of token 7 exist
    assert (first.start, first.num_tokens) == (4, 4)
    assert sim.s.prefix_queries == 10 + 12 + 8 and sim.s.prefix_hits == 8 + 4


def test_cached_pages_are_evicted_before_anything_is_preempted():
    sim = Sim(pages=6, budget=64, cap=4, page_size=4, cache=True)
    sim.add("a", 16, 1)                       # 4 pages, cached when done
    while sim.reqs:
        sim.step()
    assert sim.alloc.num_cache_only == 4
    sim.add("b", 20, 1, first=100)            # needs 5 pages of 6, nothing in common
    out = sim.step()
    assert not out.preempted and out.items[0].num_tokens == 20
    assert sim.cache.num_evicted >= 3


def test_an_eviction_frees_a_batch_of_the_pool_at_once():
    """Each eviction scans the whole tree, so one frees at least 1/512 of the pool (least recently used
    first) rather than exactly the pages short; a small pool still evicts page by page."""
    for pages, expect in ((2048, 4), (64, 1)):
        alloc = PageAllocator(pages)
        cache = RadixCache(alloc, 4)
        s = Scheduler(SchedulerConfig(16, 4, 4), alloc, cache)
        for i in range(8):                      # eight cached one-page prompts nobody uses
            p = alloc.allocate(1)
            cache.insert([100 + i] * 4, p)
            alloc.free(p)
        alloc.allocate(alloc.num_free)          # the pool is full
        assert s._make_room(1) and cache.num_evicted == expect
        assert cache.match([100] * 4) == ([], 0) and cache.match([107] * 4)[1] == 4   # the oldest went first


def test_a_prefix_computed_twice_in_one_step_is_kept_once():
    # "a" and "b" share 3 whole pages of prompt and are prefilled in the same step, so each computes them
    # into its own pages; "a" caches its copy first, "b" then moves onto it and frees its own. Without that,
    # the tree's 3 pages stay pinned under b's 4th (cache-only, yet not evictable) beside b's copies, and b's
    # 9 pages no longer fit the 10-page pool: b would be preempted.
    sim = Sim(pages=10, budget=64, cap=4, page_size=4, cache=True)
    sim.add("a", 13, 1)
    sim.add("b", 16, 20)
    b = sim.reqs["b"].seqs[0]
    sim.step()
    own = list(b.pages[:3])
    assert "a" not in sim.reqs
    tree = [sim.cache.cached_prefixes()[tuple(range((i + 1) * 4))] for i in range(3)]
    assert len(tree) == 3 and set(tree).isdisjoint(own)
    sim.step()
    assert b.pages[:3] == tree and all(sim.alloc.refcount[p] == 0 for p in own)
    assert sim.alloc.num_cache_only == 0        # every cached page is b's too: none counted reclaimable
    preempted = []
    while sim.reqs:
        preempted += sim.step().preempted
    assert not preempted
    assert sim.alloc.num_free + sim.cache.num_pages == 10
    sim.cache.clear()
    assert sim.alloc.num_free == 10


def test_a_preempted_leader_queues_ahead_of_its_blocked_siblings():
    # n = 2: the leader, preempted in the middle of the shared prompt, goes back to the queue ahead of its
    # blocked sibling. (Behind it, forking the sibling off the queue as the leader is admitted again moved
    # the queue under the admission loop, which then skipped "x" and admitted the later "y" first.)
    sim = Sim(pages=64, budget=8, cap=8, page_size=4)
    sim.add("r", 13, 4, n=2)
    sim.step()                                  # the leader: 8 of its 12 shared tokens
    leader = sim.reqs["r"].seqs[0]
    sim.s._preempt(leader)                      # as schedule() does when pages run out
    sim.add("x", 3, 4, first=100)
    sim.add("y", 2, 4, first=200)
    assert [(q.request.request_id, q.index) for q in sim.s.waiting] == [("r", 0), ("r", 1), ("x", 0), ("y", 0)]
    sim.s.config = SchedulerConfig(32, 8, 4)
    admitted = [(it.seq.request.request_id, it.seq.index) for it in sim.step().items]
    assert admitted == [("r", 0), ("x", 0), ("y", 0)]


def _running_request(rid, prompt, max_tokens, hold=False):
    req = Request(rid, prompt, SamplingParams(max_tokens=max_tokens))
    req.max_len, req.hold_kv = len(prompt) + max_tokens, hold
    req.seqs.append(Sequence(req, 0, 0, 0))
    return req


def test_kv_arriving_for_a_cached_prefix_moves_onto_the_cache():
    # The decode role: two prompts with a common 3-page prefix computed elsewhere land in pages reserved for
    # each; the second moves onto the first's cached pages at the next step, and then fits the pool alone.
    alloc = PageAllocator(10)
    cache = RadixCache(alloc, 4)
    s = Scheduler(SchedulerConfig(64, 4, 4), alloc, cache)
    a, b = _running_request("a", list(range(13)), 1).seqs[0], _running_request("b", list(range(16)), 20).seqs[0]
    s.reserve("a", 4), s.reserve("b", 4)
    s.add_running(a, s.reserved.pop("a"), 13)
    a.output_ids.append(0)
    s.add_running(b, s.reserved.pop("b"), 16)
    b.output_ids.append(0)
    own = list(b.pages[:3])
    s.finish(a)
    steps = 0
    while b.status is not SeqStatus.FINISHED:
        for it in s.schedule(lambda q: q.num_tokens < q.request.max_len).items:
            if it.samples:
                b.output_ids.append(1)
                if b.num_known >= b.request.max_len:
                    s.finish(b)
        s.check_invariants()
        if steps == 0:
            assert b.pages[:3] == cache.cached_pages(list(range(12))) != own
            assert all(alloc.refcount[p] == 0 for p in own) and alloc.num_cache_only == 0
        steps += 1
    assert s.num_preemptions == 0


def test_a_held_prefill_is_not_preempted_while_its_last_token_is_on_the_device():
    # The prefill role's request (hold_kv, one token) has drawn its token in a step still in flight; the other
    # sequence's next page must not come from it: preempted, it would finish with no pages to hand over.
    alloc = PageAllocator(3)
    s = Scheduler(SchedulerConfig(32, 4, 4), alloc)
    y = _running_request("y", [1, 2, 3, 4], 6)
    h = _running_request("h", list(range(20, 28)), 1, hold=True)
    s.add(y), s.add(h)
    for it in s.schedule(lambda q: q.num_tokens < q.request.max_len).items:
        it.seq.num_pending += 1           # drawn on the device, not yet back (the engine's overlapped loop)
    out = s.schedule(lambda q: q.num_tokens < q.request.max_len)
    assert [q.request.request_id for q in out.preempted] == ["y"]
    hs = h.seqs[0]
    hs.num_pending -= 1
    hs.output_ids.append(7)
    s.finish(hs, hold=True)
    assert len(s.held["h"].pages) == 2


@pytest.mark.parametrize("case", ["waiting", "pages"])
def test_a_prompt_scored_beside_others_in_steps_of_two_rows_stalls_nothing(case):
    """With two rows a step (max_num_seqs 2), a request scoring its prompt (prompt_logprobs: a row per position
    beside its own) took both, and the others' share was 0 rows: an earlier request waiting ahead of it ("waiting":
    admission does not overtake) or holding the pages it needed ("pages": it preempted itself) stalled every step
    after. The others keep a row; everything finishes and every page comes back."""
    ps = 4
    alloc = PageAllocator(64 if case == "waiting" else 8)
    s = Scheduler(SchedulerConfig(64, 2, ps), alloc, None)

    def req(rid, order, prompt_len, max_tokens, scored):
        r = Request(rid, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens,
                                                                 prompt_logprobs=0 if scored else None))
        r.max_len = prompt_len + max_tokens
        r.seqs.append(Sequence(r, 0, 0, order))
        if scored:
            r.prompt_logprobs = [None]
        s.add(r)
        return r.seqs[0]

    def step():
        out = s.schedule(lambda q: q.num_tokens < q.request.max_len)
        for it in out.items:
            if it.samples:
                it.seq.output_ids.append(1)
                if it.seq.num_known >= it.seq.request.max_len:
                    s.finish(it.seq)
        return out

    if case == "waiting":
        seqs = [req("A", 0, 10, 4, False), req("B", 1, 10, 4, True)]
    else:
        seqs = [req("A", 0, 20, 9, False)]
        step(), step()                                   # A holds 6 of the 8 pages
        seqs.append(req("B", 1, 20, 2, True))
    for _ in range(300):
        if all(q.status == SeqStatus.FINISHED for q in seqs):
            break
        step()
        s.check_invariants()
    assert [q.status for q in seqs] == [SeqStatus.FINISHED] * 2
    assert alloc.num_free == alloc.num_pages and s.scoring == 0


def test_a_scoring_request_queued_behind_a_waiting_one_reserves_no_rows():
    """A prompt_logprobs request queued behind one that waits for pages (no overtaking) cannot run, yet it split
    every step's rows: the running sequences past the others' half got no token until the first half finished.
    Now each of the 8 decoding sequences gets a token every step while the two wait."""
    sim = Sim(pages=40, budget=128, cap=8, page_size=4)
    for i in range(8):
        sim.add(f"d{i}", 4, 30, first=100 * i)
    for _ in range(5):
        sim.step()
    sim.add("big", 150, 1, first=5000)                # its 128-token chunk needs 32 pages, 24 are free: it waits
    req = Request("score", list(range(1000, 1020)), SamplingParams(max_tokens=1, prompt_logprobs=0))
    req.max_len, req.prompt_logprobs = 21, [None]
    req.seqs.append(Sequence(req, 0, 0, 99))
    sim.reqs["score"] = req
    sim.s.add(req)
    for _ in range(3):
        out = sim.step()
        assert sorted(it.seq.request.request_id for it in out.items) == [f"d{i}" for i in range(8)]
    assert sim.s.waiting[0].request.request_id == "big"


def test_a_request_that_cannot_be_admitted_evicts_nothing():
    """A waiting request whose chunk needs more pages than eviction could free is not admitted, and the prefix cache
    keeps its pages (it was emptied every step, for nothing: later requests lost their hits)."""
    sim = Sim(pages=20, budget=64, cap=4, page_size=4, cache=True)
    sim.add("a", 16, 1, first=0)                 # 4 pages, cached when done
    while "a" in sim.reqs:
        sim.step()
    sim.add("r", 40, 36, first=500)              # 10 pages now
    sim.step()
    cached = sim.cache.num_pages
    assert cached >= 4
    sim.add("big", 60, 1, first=900)             # its first chunk needs 15 pages: more than free + evictable
    sim.step()
    assert [q.request.request_id for q in sim.s.waiting] == ["big"]
    assert sim.cache.num_evicted == 0 and sim.cache.num_pages == cached
    sim.s.check_invariants()
