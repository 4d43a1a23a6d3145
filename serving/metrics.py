"""Prometheus export of the engine's metrics, named in the style of vLLM's (prefix ``jaxdyn:``)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from jaxdyn.engine.metrics import EngineMetrics

log = logging.getLogger("jaxdyn.metrics")


# Every metric in export order: (kind, name, help, the EngineMetrics field it reads)
_METRICS = (
    ("gauge", "jaxdyn:num_requests_running", "Requests running on the device.", "num_running"),
    ("gauge", "jaxdyn:num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
    ("gauge", "jaxdyn:kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).", "kv_usage"),
    ("gauge", "jaxdyn:kv_cache_pages_used", "KV pages in use.", "kv_pages_used"),
    ("gauge", "jaxdyn:prefix_cache_pages", "KV pages held only by the prefix cache (reclaimable).", "kv_pages_cached"),
    ("gauge", "jaxdyn:kv_cache_pages_total", "KV pages in the pool.", "kv_pages_total"),
    ("counter", "jaxdyn:prompt_tokens", "Prompt tokens of requests received.", "prompt_tokens"),
    ("counter", "jaxdyn:generation_tokens", "Tokens generated.", "generation_tokens"),
    ("counter", "jaxdyn:prefill_computed_tokens", "Prompt tokens the device computed.", "computed_prefill_tokens"),
    ("counter", "jaxdyn:num_preemptions", "Preemptions (recompute).", "preemptions"),
    ("counter", "jaxdyn:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
    ("counter", "jaxdyn:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
    ("counter", "jaxdyn:prefix_cache_evictions", "KV pages evicted from the prefix cache.", "prefix_cache_evictions"),
    ("counter", "jaxdyn:engine_steps", "Engine steps.", "steps"),
    ("counter", "jaxdyn:engine_host_seconds", "Engine loop time in its steps outside the wait for the device.",
     "host_seconds"),
    ("counter", "jaxdyn:engine_device_wait_seconds", "Engine loop time waiting for the device's results.",
     "device_wait_seconds"),
    ("counter", "jaxdyn:engine_step_call_seconds", "Of the engine's host seconds, those inside the compiled steps' "
     "calls (dispatch, and any wait for the device before a call returns).", "step_call_seconds"),
    ("counter", "jaxdyn:step_tokens", "Tokens the model steps computed.", "step_tokens"),
    ("counter", "jaxdyn:step_token_rows", "Token rows of the compiled buckets those steps ran in "
     "(step_tokens / step_token_rows: the share that was not padding).", "step_token_rows"),
    ("counter", "jaxdyn:step_calls", "Compiled calls of the model steps (more than the steps where a step ran as "
     "several smaller buckets' calls).", "step_calls"),
    ("counter", "jaxdyn:compilations_after_warmup", "XLA compilations after warm-up (should stay 0).",
     "compilations_after_warmup"),
    ("by_reason", "jaxdyn:request_success", "Finished sequences by finish reason.", "requests_finished"),
    ("by_decision", "jaxdyn:disagg_prefill_decisions", "Where prompts were computed: remote, or why local.",
     "prefill_decisions"),
    ("counter", "jaxdyn:kv_transfers", "KV handoffs from the prefill role to the decode role.", "kv_transfers"),
    ("counter", "jaxdyn:kv_transfer_bytes", "KV bytes handed to the decode role.", "kv_transfer_bytes"),
    ("counter", "jaxdyn:remote_prefill_failures", "Remote prefills failed, timed out or refused.",
     "remote_prefill_failures"),
    ("counter", "jaxdyn:remote_prefill_computed_tokens", "Prompt tokens the prefill role computed.",
     "remote_prefill_tokens"),
    ("gauge", "jaxdyn:num_remote_prefills", "Remote prefills in flight.", "num_remote_prefills"),
    ("hist", "jaxdyn:time_to_first_token_seconds", "Time to first token.", "ttft"),
    ("hist", "jaxdyn:inter_token_latency_seconds", "Time between tokens of a sequence.", "itl"),
    ("hist", "jaxdyn:e2e_request_latency_seconds", "Arrival to finish.", "e2e"),
    ("hist", "jaxdyn:request_queue_time_seconds", "Arrival to first scheduled.", "queue_time"),
    ("hist", "jaxdyn:kv_handoff_seconds", "Prefill done to its KV scattered on the decode side.", "kv_handoff"),
)


# The prefill engine of ``serve --disagg`` (its own mesh, queues and pages; the gauges above are the decode
# engine's), or the sums of the prefill workers behind a front end's decode workers (``FrontendCore.prefill_gauges``):
# (name, help, key of ``DisaggEngine.prefill_gauges``)
_PREFILL_GAUGES = (
    ("jaxdyn:prefill_role_num_requests_running", "Requests running on the prefill mesh.", "num_running"),
    ("jaxdyn:prefill_role_num_requests_waiting", "Requests waiting on the prefill mesh.", "num_waiting"),
    ("jaxdyn:prefill_role_kv_cache_pages_used", "KV pages in use on the prefill mesh.", "kv_pages_used"),
    ("jaxdyn:prefill_role_prefix_cache_pages", "KV pages held only by the prefill mesh's prefix cache.",
     "kv_pages_cached"),
    ("jaxdyn:prefill_role_kv_cache_pages_total", "KV pages in the prefill mesh's pool.", "kv_pages_total"),
)


def _read(get, what: str):
    """``get()`` (None without ``get``); one that raises is logged and read as None: its metrics are lost, not the
    page."""
    try:
        return get() if get is not None else None
    except Exception:   # noqa: BLE001
        log.exception("reading %s failed", what)
        return None


class EngineCollector:
    def __init__(self, get_metrics, model_name: str, get_prefill_gauges=None, get_worker_counts=None):
        self._get = get_metrics
        self._get_prefill = get_prefill_gauges
        self._get_workers = get_worker_counts
        self.model_name = model_name

    def collect(self):
        m: EngineMetrics | None = self._get()
        if m is None:
            return
        # a metrics object that keeps only some of its fields (``EngineMetrics.collected``: the front end over
        # workers) exports those: the others would read 0 whatever the workers did
        kept = m.collected
        lv = [self.model_name]
        for kind, name, doc, field in _METRICS:
            if kept is not None and field not in kept:
                continue
            value = getattr(m, field)
            if kind == "gauge":
                f = GaugeMetricFamily(name, doc, labels=["model_name"])
                f.add_metric(lv, value)
            elif kind == "counter":
                f = CounterMetricFamily(name, doc, labels=["model_name"])
                f.add_metric(lv, value)
            elif kind == "hist":
                f = HistogramMetricFamily(name, doc, labels=["model_name"])
                f.add_metric(lv, [(("+Inf" if le == float("inf") else repr(float(le))), c)
                                  for le, c in value.cumulative()], value.sum)
            elif kind == "by_reason":
                f = CounterMetricFamily(name, doc, labels=["model_name", "finished_reason"])
                for reason in ("stop", "length", "abort", "error"):
                    f.add_metric([self.model_name, reason], value.get(reason, 0))
            else:       # by_decision
                f = CounterMetricFamily(name, doc, labels=["model_name", "decision"])
                for decision, count in sorted(value.items()):
                    f.add_metric([self.model_name, decision], count)
            yield f
        prefill = _read(self._get_prefill, "the prefill role's gauges")
        for name, doc, key in _PREFILL_GAUGES if prefill is not None else ():
            f = GaugeMetricFamily(name, doc, labels=["model_name"])
            f.add_metric(lv, prefill[key])
            yield f
        workers = _read(self._get_workers, "the workers' counts")
        if workers is not None:
            f = GaugeMetricFamily("jaxdyn:workers", "Workers answering their health checks, by role (serve --workers).",
                                  labels=["model_name", "role"])
            for role, count in sorted(workers.items()):
                f.add_metric([self.model_name, role], count)
            yield f


def make_registry(get_metrics, model_name: str, get_prefill_gauges=None, get_worker_counts=None) -> CollectorRegistry:
    """``get_metrics``: the engine's ``EngineMetrics`` (or None: nothing exported); ``get_prefill_gauges``: an
    in-process prefill engine's gauges (``DisaggEngine.prefill_gauges``) or a front end's prefill workers'
    (``FrontendCore.prefill_gauges``); None: none exported. ``get_worker_counts``: a front end's workers answering
    their health checks, by role (``FrontendCore.worker_counts``: ``jaxdyn:workers``)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EngineCollector(get_metrics, model_name, get_prefill_gauges, get_worker_counts))
    return reg


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
