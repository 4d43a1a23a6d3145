"""From request records to vLLM's ``bench serve`` figures: counts, throughputs, latency statistics, goodput.

Keys follow vLLM's JSON (``mean_ttft_ms``, ``p99_itl_ms``, ``request_throughput``,
...). Latency statistics are over successful requests; ITL over every gap of
every successful request; TPOT per request is (e2e - ttft) / (output tokens - 1).
Goodput is the number of successful requests meeting every given SLO (TTFT,
TPOT, E2E; a one-token request has no TPOT and meets that SLO) per second of
the run.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from serving.bench.client import RequestRecord

LATENCIES = ("ttft", "tpot", "itl", "e2el")     # vLLM's names; e2el = end-to-end latency


def percentile_key(p: float) -> str:
    return f"p{int(p) if float(p).is_integer() else p}"


def parse_percentiles(text: str) -> list[float]:
    try:
        ps = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not ps or any(not 0 < p <= 100 for p in ps):
        raise ValueError(f"percentiles must be in (0, 100], got {text!r}")
    return ps


def latency_samples(records: list[RequestRecord]) -> dict[str, list[float]]:
    """Seconds, per latency kind, over the successful requests."""
    ok = [r for r in records if r.success]
    return {"ttft": [r.ttft for r in ok],
            "tpot": [r.tpot for r in ok if r.tpot is not None],
            "itl": [x for r in ok for x in r.itls],
            "e2el": [r.e2e for r in ok]}


def meets_slos(r: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """Whether a request met every SLO in ``slo_ms`` ({"ttft"|"tpot"|"e2el": milliseconds})."""
    if not r.success:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2e}
    return all(values[k] is None or values[k] * 1000 <= limit for k, limit in slo_ms.items())


def summarize(records: list[RequestRecord], duration: float, *, percentiles=(90, 99),
              slo_ms: dict[str, float] | None = None, peak_concurrency: int | None = None) -> dict:
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len or 0 for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    s = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "total_cached_tokens": sum(cached) if cached else None,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_throughput": total_out / duration if duration > 0 else None,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else None,
        "peak_concurrency": peak_concurrency,
    }
    if slo_ms:
        good = sum(meets_slos(r, slo_ms) for r in records)
        s["good_requests"] = good
        s["goodput"] = good / duration if duration > 0 else None
    for kind, xs in latency_samples(records).items():
        ms = np.asarray(xs, dtype=np.float64) * 1000.0
        s[f"mean_{kind}_ms"] = float(ms.mean()) if len(ms) else None
        s[f"median_{kind}_ms"] = float(np.median(ms)) if len(ms) else None
        s[f"std_{kind}_ms"] = float(ms.std()) if len(ms) else None
        for p in percentiles:
            s[f"{percentile_key(p)}_{kind}_ms"] = float(np.percentile(ms, p)) if len(ms) else None
    s["token_sources"] = dict(Counter(r.token_source for r in ok))
    s["errors"] = dict(Counter(r.error for r in records if not r.success).most_common())
    return s
