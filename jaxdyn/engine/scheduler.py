"""The scheduler: continuous batching with chunked prefill and preemption (plain Python, no JAX).

Each step fills a token budget (``max_num_batched_tokens``) and a sequence cap
(``max_num_seqs``):

1. Running sequences first, by (priority, admission): a decoding sequence takes
   one token, a sequence still in its prompt takes the next chunk (as much of
   the budget as is left), so a long prompt never stalls decoding.
2. Then waiting sequences, by (priority, arrival) -- or with the "lof" policy
   (SGLang's longest output first) by (priority, largest max_tokens first,
   arrival): admitted while the budget, the cap and free pages allow; the first
   that does not fit stops admission (no overtaking), and nothing is admitted in
   a step that had to preempt. Longest output first shortens an offline batch's
   tail of few running sequences when max_tokens are the outputs' lengths; under
   a steady load it can hold short requests back.

Pages are allocated as a sequence's chunk needs them. When none are free for a
running sequence, the running sequence with the largest (priority, admission)
key -- the most recently admitted one when priorities are equal -- is
preempted: its pages are freed and it goes back to the waiting queue to be
recomputed later (its generated tokens are kept). A sequence that must write
into a page shared with another (``n > 1``) gets a private copy first; the
copies are listed in the batch for the runner to make before the step.

With a prefix cache (``jaxdyn.kv.radix.RadixCache``), a sequence admitted
with nothing computed first takes the longest cached prefix of its tokens in
whole pages (always leaving at least one token to compute, for its logits) and
prefills only the rest. A sequence's computed whole pages go into the cache
when its prompt is done, when it finishes or is aborted, and when it is
preempted (so its recomputation is mostly a cache hit). Pages only the cache
holds are evicted, least recently used first, before anything is preempted.

A request never deadlocks the pool: the engine refuses any request whose
longest possible sequence needs more pages than the pool has, so a sequence
alone always fits.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools

from jaxdyn.engine.request import Request, Sequence, SeqStatus
from jaxdyn.kv.allocator import PageAllocator
from jaxdyn.kv.radix import RadixCache


SCHEDULE_POLICIES = ("fcfs", "lof")


def _run_key(seq: Sequence) -> tuple[int, int]:
    """A running sequence's order: priority (lower first), then admission."""
    return seq.request.priority, seq.admit_order


def check_schedule_policy(policy):
    """``policy`` if it is one of SCHEDULE_POLICIES (ValueError naming them otherwise)."""
    if policy not in SCHEDULE_POLICIES:
        raise ValueError(f"schedule_policy: expected one of {', '.join(SCHEDULE_POLICIES)}, got {policy!r}")
    return policy


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    page_size: int
    policy: str = "fcfs"          # waiting order: "fcfs" (priority, arrival) or "lof" (longest max_tokens first)

    def __post_init__(self):
        check_schedule_policy(self.policy)


@dataclasses.dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int              # first position computed
    num_tokens: int
    samples: bool           # the chunk reaches the sequence's end: a token is drawn
    scored: tuple[int, int] | None = None   # prompt_logprobs: the positions a..b-1 whose next prompt token it scores


@dataclasses.dataclass
class SchedulerOutput:
    items: list[ScheduledSeq]
    copies: list[tuple[int, int]]      # (src page, dst page) to copy before the step
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator, cache: RadixCache | None = None):
        self.config = config
        self.allocator = allocator
        self.cache = cache
        self.prefix_queries = 0         # tokens of admitted sequences looked up in the cache
        self.prefix_hits = 0            # of which found
        self.waiting: list[Sequence] = []       # sorted by _wait_key: (priority, arrival) for fcfs
        self.running: list[Sequence] = []       # in admission order
        self._admits = itertools.count()
        self.num_preemptions = 0
        # Disaggregation: pages a finished prefill keeps until its KV is sent (prefill role), and
        # pages reserved for KV that is on its way (decode role), both keyed by request id.
        self.held: dict[str, Sequence] = {}
        # running sequences whose cached whole pages may duplicate pages the tree already held, with the
        # number of those pages: moved onto the tree's at the next step (_share_cached_copies)
        self._copies_to_share: list[tuple[Sequence, int]] = []
        self.scoring = 0              # requests whose prompts are still to be scored (prompt_logprobs)
        self.reserved: dict[str, list[int]] = {}

    # ---- queue management --------------------------------------------------------------------

    def add(self, request: Request) -> None:
        if request.prompt_logprobs is not None and len(request.prompt_ids) > 1:
            request.scoring_open = True           # counted in self.scoring until its prompt is scored or it ends
            self.scoring += 1
        for seq in request.seqs:
            self._push_waiting(seq)

    def _wait_key(self, seq: Sequence) -> tuple:
        if self.config.policy == "lof":
            max_tokens = seq.request.params.max_tokens
            return (seq.request.priority, -(max_tokens if max_tokens is not None else float("inf")),
                    seq.arrival_order, seq.index)
        return seq.sort_key

    def waiting_work(self, at_least: int) -> int:
        """Tokens the waiting sequences have still to compute, from the queue's front, each less the cached prefix
        admission would reuse now (``_match``: whole pages, short of its last token; none for a prompt to be
        scored), summed until ``at_least`` is reached (the rest of the queue not looked at). Changes nothing."""
        total = 0
        for seq in self.waiting:
            if total >= at_least:
                break
            if seq.blocked or seq.num_pending:      # not admitted yet whatever the budget (as ``schedule``)
                continue
            target = self._target(seq)
            n = target - seq.num_computed
            if limit := self._reusable(seq, target):
                n -= self.cache.peek(seq.token_slice(0, limit), seq.request.params.cache_salt)
            total += max(n, 0)
        return total

    def _push_waiting(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        # the keys of the O(log n) sequences the search visits only, not of the whole queue on every push
        self.waiting.insert(bisect.bisect_right(self.waiting, self._wait_key(seq), key=self._wait_key), seq)

    def finish(self, seq: Sequence, hold: bool = False) -> None:
        """Take a sequence out of the scheduler and free its pages (stop, length or abort).

        ``hold``: keep the pages (and their contents) until ``release`` -- a prefill whose KV
        is still to be read for the decode side.
        """
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        req = seq.request
        if req.scoring_open and all(s.status is SeqStatus.FINISHED for s in req.seqs):
            req.scoring_open = False              # ended (aborted) before its prompt was scored
            self.scoring -= 1
        if hold and seq.pages:
            self.held[seq.request.request_id] = seq
            return
        self._cache_pages(seq)
        self._free_pages(seq)

    def release(self, request_id: str) -> None:
        """Free the pages a held sequence kept (into the prefix cache where whole and computed)."""
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self._cache_pages(seq)
            self._free_pages(seq)

    def reserve(self, request_id: str, n: int) -> list[int] | None:
        """Set aside ``n`` pages for KV arriving from elsewhere (evicting cached pages if need be)."""
        if request_id in self.reserved:
            raise ValueError(f"pages already reserved for {request_id!r}")
        if not self._make_room(n):
            return None
        pages = self.allocator.allocate(n)
        self.reserved[request_id] = pages
        return pages

    def unreserve(self, request_id: str) -> None:
        pages = self.reserved.pop(request_id, None)
        if pages:
            self.allocator.free(pages)

    def add_running(self, seq: Sequence, pages: list[int], num_computed: int) -> None:
        """Admit a sequence whose first ``num_computed`` tokens' KV is already in ``pages``."""
        seq.pages = list(pages)
        seq.num_computed = num_computed
        seq.status = SeqStatus.RUNNING
        seq.admit_order = next(self._admits)
        self._add_running(seq)
        # Its prompt is complete: cache it now, as for a prompt finished in a step.
        self._cache_prompt(seq)

    def _cache_pages(self, seq: Sequence) -> int:
        """Put the sequence's computed whole pages of known tokens into the prefix cache; returns how many
        pages that was (those the tree already held for the same tokens included)."""
        if self.cache is None or not seq.pages:
            return 0
        full = min(seq.num_computed, seq.num_known) // self.config.page_size
        if full:
            self.cache.insert(seq.token_slice(0, full * self.config.page_size), seq.pages[:full],
                              seq.request.params.cache_salt)
        return full

    def _cache_prompt(self, seq: Sequence) -> None:
        """Cache a running sequence's finished prompt, and move it onto the tree's pages at the next step where
        another's KV for the same tokens got there first (``_share_cached_copies``)."""
        if n := self._cache_pages(seq):
            self._copies_to_share.append((seq, n))

    def _share_cached_copies(self) -> None:
        """Move running sequences onto the tree's pages where theirs hold the same tokens, freeing their copies.

        Two prompts with a common prefix prefilled in the same step each compute it into pages of their own;
        the first to finish its prompt caches them, the second caches only the pages past them (``insert``
        keeps what the tree holds). Its copies would stay in use as long as it runs, and the tree's pages
        of that prefix would count as reclaimable (held by the tree alone) without being evictable (inner
        nodes, below the second's pages). This runs as the next step is built: the copies were written by
        the previous step (dispatched already, so ahead of anything this step writes into a freed page),
        and nothing writes a whole computed page again."""
        pending, self._copies_to_share = self._copies_to_share, []
        ps = self.config.page_size
        for seq, n in pending:
            if seq.status is not SeqStatus.RUNNING or len(seq.pages) < n:
                continue
            cached = self.cache.cached_pages(seq.token_slice(0, n * ps), seq.request.params.cache_salt)
            moves = [(i, p) for i, p in enumerate(cached) if p != seq.pages[i]]
            if not moves:
                continue
            pages = list(seq.pages)       # a new list: Sequence.page_array caches by identity
            self.allocator.share([p for _, p in moves])
            self.allocator.free([pages[i] for i, _ in moves])
            for i, p in moves:
                pages[i] = p
            seq.pages = pages

    def _free_pages(self, seq: Sequence) -> None:
        if seq.pages:
            self.allocator.free(seq.pages)
            seq.pages = []
        seq.num_computed = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------

    def _add_running(self, seq: Sequence) -> None:
        """Put ``seq`` (its admit_order set) into ``running``, which stays in (priority, admission) order: a step
        serves the most urgent first, and the victim a preemption picks among the sequences not yet scheduled (the
        largest key) is then the largest of all running, never one scheduled before it (a high-priority sequence
        admitted later preempted itself while a low-priority one kept its pages)."""
        bisect.insort(self.running, seq, key=_run_key)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._cache_pages(seq)
        self._free_pages(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(seq)

    def _pages_for(self, seq: Sequence, end: int) -> tuple[int, bool]:
        """(new pages needed to hold tokens up to ``end``, whether the first written page is shared)."""
        ps = self.config.page_size
        need = -(-end // ps) - len(seq.pages)
        first = seq.num_computed // ps
        shared = first < len(seq.pages) and self.allocator.is_shared(seq.pages[first])
        return max(need, 0), shared

    def _make_room(self, n: int) -> bool:
        """Whether ``n`` pages can be allocated, evicting cached pages nobody uses if need be (none when that
        would not free enough).

        An eviction scans every leaf of the tree, so it frees at least 1/512 of the pool at once (the least
        recently used pages): with a full cache, evicting page by page cost 2.7 ms a step of a 1,000-request
        ShareGPT-shaped run on the H200 (4,275 scans, 6.3 M leaf checks; ``benchmarks/gpu/profile_host.py``)."""
        short = n - self.allocator.num_free
        if short > 0 and self.cache is not None:
            if short > self.allocator.num_cache_only:
                # eviction cannot free enough (only pages nobody else holds go): keep the cache (evicting it
                # all, a waiting request too large for the pool left emptied it every step, for nothing)
                return False
            self.cache.evict(max(short, self.allocator.num_pages // 512))
        return self.allocator.can_allocate(n)

    def _reserve(self, seq: Sequence, end: int, copies: list) -> bool:
        need, shared = self._pages_for(seq, end)
        if not self._make_room(need + int(shared)):
            return False
        if shared:
            first = seq.num_computed // self.config.page_size
            old = seq.pages[first]
            new = self.allocator.fork_for_write(old)
            # A new list, not an element changed in place: Sequence.page_array caches by identity.
            seq.pages = seq.pages[:first] + [new] + seq.pages[first + 1:]
            copies.append((old, new))
        if need:
            seq.pages.extend(self.allocator.allocate(need))
        return True

    def _target(self, seq: Sequence) -> int:
        """Position this sequence computes up to next: its end, or the shared-prompt fork point."""
        return seq.fork_target if seq.fork_target is not None else seq.num_tokens

    def schedule(self, can_sample) -> SchedulerOutput:
        """Build the next step. ``can_sample(seq)``: whether the sequence may draw another token."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        items: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()
        self._forked: list[Sequence] = []     # siblings forked this step join running after it
        self._prompts_done: list[Sequence] = []
        if self._copies_to_share:
            self._share_cached_copies()

        ps = cfg.page_size
        is_shared = self.allocator.is_shared
        running = self.running
        self._score_rows = 0                  # rows of this step that score prompt tokens (prompt_logprobs)
        self._scoring_items = 0               # sequences of this step that score (their own rows)
        # With requests scoring their prompts (each position a row) beside others, the step's rows are shared:
        # at most half for the scoring ones (their own rows and their positions'), the rest kept for the others
        # (a scored prompt took every row: nothing else was admitted meanwhile, or the reverse).
        rows = self._rows = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self._scoring_cap = self._others_cap = rows
        if self.scoring and len(self.running) + len(self.waiting) > self.scoring and self._scoring_may_run():
            self._scoring_cap = max(2, rows // 2)
            # at least one row for the others: with two rows a step (a scoring request needs both) they had none,
            # and the first of them waiting or holding pages stalled the engine for good
            self._others_cap = max(1, rows - self._scoring_cap)
        i = 0
        while i < len(running) and budget > 0 and len(items) + self._score_rows < cfg.max_num_seqs:
            seq = running[i]
            num_tokens = len(seq.prompt_ids) + len(seq.output_ids) + seq.num_pending
            target = seq.fork_target if seq.fork_target is not None else num_tokens
            computed = seq.num_computed
            if computed >= target or (target == num_tokens and not can_sample(seq)):
                i += 1
                continue
            n = min(target - computed, budget)
            if self.scoring:
                n = self._chunk(seq, computed, n, len(items))
                if n == 0:                # its rows do not fit this step's share
                    i += 1
                    continue
            end = computed + n
            pages = seq.pages
            first = computed // ps
            if end <= len(pages) * ps and (first >= len(pages) or not is_shared(pages[first])):
                # Its pages already hold the chunk and none it writes is shared (most decode steps).
                items.append(self._take(seq, n, target))
                scheduled.add(seq.seq_id)
                budget -= n
                i += 1
                continue
            ok = True
            while not self._reserve(seq, seq.num_computed + n, copies):
                # not a sequence whose KV is held for a hand-over once its last token (drawn, still on the
                # device) arrives: preempted, it would finish with no pages and the decode side get nothing
                # (running is in _run_key order: the victim sits at i or after, unless seq itself is not one)
                victim = max((s for s in self.running if s.seq_id not in scheduled
                              and not (s.request.hold_kv and not can_sample(s))),
                             key=_run_key, default=None)
                if victim is None:        # nothing to preempt: seq waits for pages to be freed
                    ok = False
                    i += 1
                    break
                if running.index(victim) < i:
                    i -= 1
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    ok = False
                    break
            if not ok:
                continue                  # self.running[i] is the next one
            items.append(self._take(seq, n, target))
            scheduled.add(seq.seq_id)
            budget -= n
            i += 1

        if not preempted:
            j = 0
            while j < len(self.waiting) and budget > 0 and len(items) + self._score_rows < cfg.max_num_seqs:
                seq = self.waiting[j]
                if seq.blocked or seq.num_pending:
                    j += 1
                    continue
                target = self._target(seq)
                if target == seq.num_tokens and not can_sample(seq):
                    j += 1
                    continue
                n = min(target - seq.num_computed, budget)
                if self.scoring and (n := self._chunk(seq, seq.num_computed, n, len(items))) == 0:
                    break                 # its rows do not fit this step's share (no overtaking)
                cached = self._match(seq, target)     # none for a prompt still to be scored: its chunk stands
                if cached:
                    n = min(target - seq.num_computed, budget)
                if not self._reserve(seq, seq.num_computed + n, copies):
                    if cached:
                        self._free_pages(seq)
                    break
                if self.cache is not None:
                    self.prefix_queries += seq.num_tokens
                    self.prefix_hits += cached
                    if seq.num_preemptions == 0 and seq.index == 0:
                        seq.request.num_cached_tokens = cached
                self.waiting.pop(j)
                seq.status = SeqStatus.RUNNING
                seq.admit_order = next(self._admits)
                self._add_running(seq)
                items.append(self._take(seq, n, target))
                scheduled.add(seq.seq_id)
                budget -= n
        for sib in self._forked:
            self._add_running(sib)
        # Prompts finished in this step enter the cache now, so that the sequences admitted from the
        # next step on can share them (their last pages are written by this very step).
        for seq in self._prompts_done:
            self._cache_prompt(seq)
        return SchedulerOutput(items, copies, preempted)

    def _scoring_may_run(self) -> bool:
        """Whether a sequence scoring its prompt may take rows this step: one running, or the first waiting one
        admission would look at. A scoring request queued behind another that waits for pages (no overtaking)
        reserves no rows: it held half of every step's rows, and the running sequences past the others' share got
        no token until those before them had finished."""
        if any(s.request.scoring_open for s in self.running):
            return True
        for s in self.waiting:
            if not (s.blocked or s.num_pending):
                return s.request.scoring_open
        return False

    def _reusable(self, seq: Sequence, target: int) -> int:
        """The tokens of ``seq`` a cached prefix may cover when it is admitted up to ``target`` (``_match``; what
        ``waiting_work`` looks up): all but the last, of which the logits are computed, or 0 where none is looked up
        (no cache, pages held already, or a prompt to be scored: its tokens computed, not taken from the cache)."""
        if self.cache is None or seq.pages or seq.request.scoring_open:
            return 0
        return max(target - 1, 0)

    def _match(self, seq: Sequence, target: int) -> int:
        """Reuse the longest cached prefix (whole pages, short of ``target``); returns its length in tokens."""
        limit = self._reusable(seq, target)
        if not limit:
            return 0
        pages, n = self.cache.match(seq.token_slice(0, limit), limit, seq.request.params.cache_salt)
        if n:
            self.allocator.share(pages)
            seq.pages = pages
            seq.num_computed = n
        return n

    def _chunk(self, seq: Sequence, computed: int, n: int, num_items: int) -> int:
        """With requests scoring their prompts about: the tokens of ``seq``'s next chunk (at most ``n``) that fit
        this step's rows, 0 when none does. A prompt position scored for ``prompt_logprobs`` takes a row of its own
        beside its sequence's; the scoring sequences share ``_scoring_cap`` rows, the others ``_others_cap``."""
        req = seq.request
        if not req.scoring_open:
            return n if num_items - self._scoring_items < self._others_cap else 0
        a, b = req.scoring_rows(computed, computed + n)
        if a == b:
            return n if self._scoring_items + self._score_rows < self._scoring_cap else 0
        # rows for its positions: of the step's, and of the scoring sequences' share (each less its own row)
        room = min(self._rows - num_items, self._scoring_cap - self._scoring_items) - self._score_rows - 1
        if room <= 0:
            return 0
        if b - a > room:              # the chunk ends where the rows run out
            n = a + room - computed
        return n

    def _take(self, seq: Sequence, n: int, target: int) -> ScheduledSeq:
        start = seq.num_computed
        req = seq.request
        scored = None
        if req.scoring_open:
            self._scoring_items += 1
            a, b = req.scoring_rows(start, start + n)
            if a < b:
                scored = (a, b)
                self._score_rows += b - a
                req.score_next = b
                if b >= len(req.prompt_ids) - 1:      # every prompt token scored
                    req.scoring_open = False
                    self.scoring -= 1
        computed = seq.num_computed = start + n
        prompt_len = len(seq.prompt_ids)
        if start < prompt_len <= computed:
            self._prompts_done.append(seq)    # cached once this step is built (see schedule)
        samples = computed == prompt_len + len(seq.output_ids) + seq.num_pending
        if seq.fork_target is not None and computed == seq.fork_target:
            self._fork(seq)
        return ScheduledSeq(seq, start, n, samples, scored)

    def _fork(self, leader: Sequence) -> None:
        """n > 1: the shared prompt is computed (or scheduled); siblings take references to its pages."""
        leader.fork_target = None
        for sib in leader.request.seqs:
            if sib is leader or not sib.blocked:
                continue
            sib.blocked = False
            if sib.status is SeqStatus.FINISHED:
                continue
            self.waiting.remove(sib)
            sib.pages = list(leader.pages)
            self.allocator.share(sib.pages)
            sib.num_computed = leader.num_computed
            sib.status = SeqStatus.RUNNING
            sib.admit_order = next(self._admits)
            self._forked.append(sib)

    def check_invariants(self) -> None:
        self.allocator.check_invariants()
        scoring = {id(s.request) for s in self.running + self.waiting if s.request.scoring_open}
        assert self.scoring == len(scoring), f"{self.scoring} requests counted scoring, {len(scoring)} are"
        counts: dict[int, int] = {}
        for s in self.running + self.waiting + list(self.held.values()):
            for p in s.pages:
                counts[p] = counts.get(p, 0) + 1
        for pages in self.reserved.values():
            for p in pages:
                counts[p] = counts.get(p, 0) + 1
        if self.cache is not None:
            self.cache.check_invariants()
            for p in self.cache.cached_prefixes().values():
                counts[p] = counts.get(p, 0) + 1
        for p, c in counts.items():
            assert self.allocator.refcount[p] == c, f"page {p}: refcount {self.allocator.refcount[p]} != {c}"
        for s in self.waiting:
            assert s.status is SeqStatus.WAITING and not s.pages
        for s in self.running:
            assert s.status is SeqStatus.RUNNING

