"""Prometheus export of the engine's metrics, named in the style of vLLM's (prefix ``jaxdyn:``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from jaxdyn.engine.metrics import EngineMetrics, Histogram


class EngineCollector:
    def __init__(self, get_metrics, model_name: str):
        self._get = get_metrics
        self.model_name = model_name

    def collect(self):
        m: EngineMetrics | None = self._get()
        if m is None:
            return
        # a metrics object that keeps only some of its fields (``EngineMetrics.collected``: the front end over
        # workers) exports those: the others would read 0 whatever the workers did
        kept = getattr(m, "collected", None)
        for family, fields in self._families(m):
            if kept is None or any(f in kept for f in fields):
                yield family

    def _families(self, m: EngineMetrics):
        """(metric family, the EngineMetrics fields it reads) of every metric."""
        labels, lv = ["model_name"], [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(lv, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(lv, value)
            return c

        def hist(name, doc, h: Histogram):
            f = HistogramMetricFamily(name, doc, labels=labels)
            buckets = [(("+Inf" if le == float("inf") else repr(float(le))), c) for le, c in h.cumulative()]
            f.add_metric(lv, buckets, h.sum)
            return f

        yield gauge("jaxdyn:num_requests_running", "Requests running on the device.", m.num_running), ('num_running',)
        yield gauge("jaxdyn:num_requests_waiting", "Requests waiting to be scheduled.", m.num_waiting), ('num_waiting',)
        yield gauge("jaxdyn:kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).", m.kv_usage), ('kv_usage',)
        yield gauge("jaxdyn:kv_cache_pages_used", "KV pages in use.", m.kv_pages_used), ('kv_pages_used',)
        yield gauge("jaxdyn:prefix_cache_pages", "KV pages held only by the prefix cache (reclaimable).",
                    m.kv_pages_cached), ('kv_pages_cached',)
        yield gauge("jaxdyn:kv_cache_pages_total", "KV pages in the pool.", m.kv_pages_total), ('kv_pages_total',)
        yield counter("jaxdyn:prompt_tokens", "Prompt tokens of requests received.", m.prompt_tokens), \
            ('prompt_tokens',)
        yield counter("jaxdyn:generation_tokens", "Tokens generated.", m.generation_tokens), ('generation_tokens',)
        yield counter("jaxdyn:prefill_computed_tokens", "Prompt tokens the device computed.",
                      m.computed_prefill_tokens), ('computed_prefill_tokens',)
        yield counter("jaxdyn:num_preemptions", "Preemptions (recompute).", m.preemptions), ('preemptions',)
        yield counter("jaxdyn:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      m.prefix_cache_queries), ('prefix_cache_queries',)
        yield counter("jaxdyn:prefix_cache_hits", "Prompt tokens found in the prefix cache.", m.prefix_cache_hits), \
            ('prefix_cache_hits',)
        yield counter("jaxdyn:prefix_cache_evictions", "KV pages evicted from the prefix cache.",
                      m.prefix_cache_evictions), ('prefix_cache_evictions',)
        yield counter("jaxdyn:engine_steps", "Engine steps.", m.steps), ('steps',)
        yield counter("jaxdyn:engine_host_seconds", "Engine loop time in its steps outside the wait for the device.",
                      m.host_seconds), ('host_seconds',)
        yield counter("jaxdyn:engine_device_wait_seconds", "Engine loop time waiting for the device's results.",
                      m.device_wait_seconds), ('device_wait_seconds',)
        yield counter("jaxdyn:engine_step_call_seconds", "Of the engine's host seconds, those inside the compiled "
                      "steps' calls (dispatch, and any wait for the device before a call returns).",
                      m.step_call_seconds), ('step_call_seconds',)
        yield counter("jaxdyn:step_tokens", "Tokens the model steps computed.", m.step_tokens), ('step_tokens',)
        yield counter("jaxdyn:step_token_rows", "Token rows of the compiled buckets those steps ran in "
                      "(step_tokens / step_token_rows: the share that was not padding).", m.step_token_rows), \
                          ('step_token_rows',)
        yield counter("jaxdyn:step_calls", "Compiled calls of the model steps (more than the steps where a step "
                      "ran as several smaller buckets' calls).", m.step_calls), ('step_calls',)
        yield counter("jaxdyn:compilations_after_warmup", "XLA compilations after warm-up (should stay 0).",
                      m.compilations_after_warmup), ('compilations_after_warmup',)
        done = CounterMetricFamily("jaxdyn:request_success", "Finished sequences by finish reason.",
                                   labels=["model_name", "finished_reason"])
        for reason in ("stop", "length", "abort", "error"):
            done.add_metric([self.model_name, reason], m.requests_finished.get(reason, 0))
        yield done, ("requests_finished",)
        decisions = CounterMetricFamily(
            "jaxdyn:disagg_prefill_decisions", "Where prompts were computed: remote, or why local.",
            labels=["model_name", "decision"])
        for decision, count in sorted(m.prefill_decisions.items()):
            decisions.add_metric([self.model_name, decision], count)
        yield decisions, ("prefill_decisions",)
        yield counter("jaxdyn:kv_transfers", "KV handoffs from the prefill role to the decode role.",
                      m.kv_transfers), ('kv_transfers',)
        yield counter("jaxdyn:kv_transfer_bytes", "KV bytes handed to the decode role.", m.kv_transfer_bytes), \
            ('kv_transfer_bytes',)
        yield counter("jaxdyn:remote_prefill_failures", "Remote prefills failed, timed out or refused.",
                      m.remote_prefill_failures), ('remote_prefill_failures',)
        yield counter("jaxdyn:remote_prefill_computed_tokens", "Prompt tokens the prefill role computed.",
                      m.remote_prefill_tokens), ('remote_prefill_tokens',)
        yield gauge("jaxdyn:num_remote_prefills", "Remote prefills in flight.", m.num_remote_prefills), \
            ('num_remote_prefills',)
        yield hist("jaxdyn:time_to_first_token_seconds", "Time to first token.", m.ttft), ('ttft',)
        yield hist("jaxdyn:inter_token_latency_seconds", "Time between tokens of a sequence.", m.itl), ('itl',)
        yield hist("jaxdyn:e2e_request_latency_seconds", "Arrival to finish.", m.e2e), ('e2e',)
        yield hist("jaxdyn:request_queue_time_seconds", "Arrival to first scheduled.", m.queue_time), ('queue_time',)
        yield hist("jaxdyn:kv_handoff_seconds", "Prefill done to its KV scattered on the decode side.",
                   m.kv_handoff), ('kv_handoff',)


def make_registry(get_metrics, model_name: str) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EngineCollector(get_metrics, model_name))
    return reg


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
