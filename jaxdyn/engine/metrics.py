"""Metrics the engine keeps for the server to export (plain Python; Prometheus-shaped).

Counters only grow; gauges are read at export time; histograms keep
cumulative bucket counts and a sum, as Prometheus does, so the server turns
them into text without knowing the engine.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # last: +Inf
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def __getstate__(self):     # pickled without its lock (a snapshot sent from the engine process)
        with self._lock:
            return {k: (list(v) if k == "counts" else v) for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def cumulative(self) -> list[tuple[float, int]]:
        out, total = [], 0
        for le, c in zip((*self.buckets, float("inf")), self.counts):
            total += c
            out.append((le, total))
        return out


@dataclasses.dataclass
class EngineMetrics:
    # counters
    prompt_tokens: int = 0             # prompt tokens of finished-or-running requests, once each
    generation_tokens: int = 0
    computed_prefill_tokens: int = 0   # prompt (and recomputed) tokens the device actually ran
    preemptions: int = 0
    requests_finished: dict = dataclasses.field(default_factory=dict)   # finish_reason -> count
    prefix_cache_queries: int = 0      # tokens looked up
    prefix_cache_hits: int = 0         # tokens found
    prefix_cache_evictions: int = 0    # pages evicted
    compilations_after_warmup: int = 0
    steps: int = 0
    # the engine loop's own time (seconds, summed over steps): in step() outside the wait for the device, and
    # that wait; with the steps, host ms a step (a loop slowed by other Python work in its process shows here)
    host_seconds: float = 0.0
    device_wait_seconds: float = 0.0
    # of host_seconds, the time inside the compiled steps' calls: a call that returns only once the device has
    # finished the step before it shows here, not as device wait (ModelRunner.call_seconds)
    step_call_seconds: float = 0.0
    # the model steps' real tokens, the bucket rows they ran in (tokens / rows: the share not padding) and
    # their compiled calls (more than the steps where steps were split: ``ModelRunner.plan``)
    step_tokens: int = 0
    step_token_rows: int = 0
    step_calls: int = 0
    # disaggregation (jaxdyn.disagg): where prompts were computed and the KV that moved
    prefill_decisions: dict = dataclasses.field(default_factory=dict)   # "remote" or why local -> count
    kv_transfers: int = 0
    kv_transfer_bytes: int = 0
    remote_prefill_failures: int = 0   # failed, timed out, or refused on the prefill side
    remote_prefill_tokens: int = 0     # prompt tokens the prefill role computed
    num_remote_prefills: int = 0       # gauge: remote prefills in flight
    # gauges (set by the engine each step)
    num_running: int = 0
    num_waiting: int = 0
    kv_pages_used: int = 0             # held by requests
    kv_pages_cached: int = 0           # held only by the prefix cache (reclaimable)
    kv_pages_total: int = 0
    # histograms (seconds)
    ttft: Histogram = dataclasses.field(default_factory=Histogram)
    itl: Histogram = dataclasses.field(default_factory=Histogram)
    e2e: Histogram = dataclasses.field(default_factory=Histogram)
    queue_time: Histogram = dataclasses.field(default_factory=Histogram)
    kv_handoff: Histogram = dataclasses.field(default_factory=Histogram)   # prefill done -> KV scattered
    # the fields this object keeps (None: all): a front end over workers keeps a few, and /metrics exports only
    # those (the rest would read 0 whatever the workers did)
    collected: frozenset | None = None

    @property
    def kv_usage(self) -> float:
        return self.kv_pages_used / self.kv_pages_total if self.kv_pages_total else 0.0

    def of_a_dead_engine(self) -> "EngineMetrics":
        """A copy for an engine that died: its requests, pages and cache are gone with it, so its queue and page
        gauges read 0 (the totals, counters and histograms stay)."""
        return dataclasses.replace(self, num_running=0, num_waiting=0, kv_pages_used=0, kv_pages_cached=0,
                                   num_remote_prefills=0)


# What a worker process reports to the front end over it (``serving/workers``: its Health replies), which sums the
# reports: the engine's own counters and histograms, and the gauges the front end cannot see for itself. The front
# end counts its requests' tokens, finishes and latencies itself, and takes running / waiting / KV pages from the
# replies' own fields.
WORKER_COUNTERS = ("computed_prefill_tokens", "preemptions", "prefix_cache_queries", "prefix_cache_hits",
                   "prefix_cache_evictions", "compilations_after_warmup", "steps", "host_seconds",
                   "device_wait_seconds", "step_call_seconds", "step_tokens", "step_token_rows", "step_calls",
                   "prefill_decisions", "kv_transfers", "kv_transfer_bytes", "remote_prefill_failures",
                   "remote_prefill_tokens")
WORKER_GAUGES = ("kv_pages_cached", "num_remote_prefills")
WORKER_HISTOGRAMS = ("queue_time", "kv_handoff")
WORKER_FIELDS = WORKER_COUNTERS + WORKER_GAUGES + WORKER_HISTOGRAMS


def worker_report(m: EngineMetrics) -> dict:
    """``m``'s fields of ``WORKER_FIELDS``, as JSON-able values (a histogram: its buckets, counts, sum, count)."""
    out = {f: dict(getattr(m, f)) if isinstance(getattr(m, f), dict) else getattr(m, f)
           for f in WORKER_COUNTERS + WORKER_GAUGES}
    for f in WORKER_HISTOGRAMS:
        h = getattr(m, f).__getstate__()
        out[f] = {"buckets": list(h["buckets"]), "counts": h["counts"], "sum": h["sum"], "count": h["count"]}
    return out


def _number(v) -> bool:
    # an int past 2**63 is no counter of ours (one past a float's range broke the whole /metrics page as Prometheus'
    # client rendered it)
    return isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool) and -2 ** 63 <= v < 2 ** 63)


def set_worker_sums(m: EngineMetrics, counted: list[dict], live: list[dict]) -> None:
    """Set ``m``'s ``WORKER_FIELDS`` to sums of workers' reports: counters and histograms over ``counted`` (every
    worker process's last report, a lost or restarted one's too: counters do not fall), gauges over ``live``. A
    value of another shape (a worker of another version) is left out of its sum."""
    for f in WORKER_COUNTERS:
        values = [r.get(f) for r in counted]
        if f == "prefill_decisions":
            total: dict = {}
            for v in values:
                for k, c in (v.items() if isinstance(v, dict) else ()):
                    if _number(c):
                        total[k] = total.get(k, 0) + c
            setattr(m, f, total)
        else:
            setattr(m, f, sum(v for v in values if _number(v)))
    for f in WORKER_GAUGES:
        setattr(m, f, sum(r.get(f) for r in live if _number(r.get(f))))
    for f in WORKER_HISTOGRAMS:
        h = Histogram()
        for r in counted:
            v = r.get(f)
            if (isinstance(v, dict) and isinstance(v.get("buckets"), list) and tuple(v["buckets"]) == h.buckets
                    and isinstance(v.get("counts"), list) and len(v["counts"]) == len(h.counts)
                    and all(_number(c) for c in v["counts"]) and _number(v.get("sum")) and _number(v.get("count"))):
                h.counts = [a + b for a, b in zip(h.counts, v["counts"])]
                h.sum += v["sum"]
                h.count += v["count"]
        setattr(m, f, h)
