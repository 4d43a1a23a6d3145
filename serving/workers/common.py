"""What crosses the wire between jaxdyn workers and the frontend: sampling parameters, output
increments and logprobs as JSON inside the protobuf messages of ``worker.proto``, and the gRPC
status codes of failures."""

from __future__ import annotations

import dataclasses
import json

import grpc
import jax.numpy as jnp

from jaxdyn.engine.request import CompletionOutput, Logprob, RequestOutput
from jaxdyn.engine.sampling_params import SamplingParams, SamplingParamsError
from serving.workers import worker_pb2 as pb

# Messages up to 64 MiB (KV chunks are 4 MiB; the default 4 MiB cap is for the rest).
KV_CHUNK_BYTES = 4 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20),
                   ("grpc.max_receive_message_length", 64 << 20)]
# A client's channel to a worker: its reconnect backoff capped at a second (gRPC's default grows from 1 s to 120 s,
# so a worker back after a minute down, or first listening after a long warm-up, was used again only 30-40 s later:
# its health checks failed fast on the channel's backoff meanwhile, and requests got 503s or prefilled locally).
# (gRPC's "grpc.min_reconnect_backoff_ms" is a connection attempt's minimum timeout, left at its 20 s.)
CLIENT_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS,
                          ("grpc.initial_reconnect_backoff_ms", 500),
                          ("grpc.max_reconnect_backoff_ms", 1000)]


# A prefill worker's queues and pages (``EngineCore.gauges``' keys) as a decode worker last read them from its Health
# reply, passed on in the decode worker's own Health report (``"prefill_workers"``) to a front end, which exports
# their sums as the ``jaxdyn:prefill_role_*`` gauges.
PREFILL_GAUGE_KEYS = ("num_running", "num_waiting", "kv_pages_used", "kv_pages_cached", "kv_pages_total")


def _count(v) -> bool:
    """A count as a report may hold it: an int in [0, 2**53) (a larger one could not be a float's exact value, and
    one past a float's range broke the whole /metrics page as Prometheus' client rendered it)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 53


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 literal bracketed (``[::1]:50051``), as gRPC takes an address."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def start_transfer_server(client, host: str):
    """A ``jax.experimental.transfer`` server of ``client`` on ``host``, a port of the system's choosing."""
    from jax.experimental import transfer
    bind = host_port(host, 0)
    return transfer.start_transfer_server(client, bind, [bind])


def prefill_worker_report(address: str, reply) -> dict:
    """A prefill worker's Health ``reply`` as a decode worker passes it on: its gauges, and the ``instance`` of its
    process (its address where the reply has none), by which a front end whose decode workers share the prefill
    worker counts it once. The prefix cache's pages come from the reply's metrics report (0 where it has none)."""
    try:
        report = json.loads(reply.metrics_json) if reply.metrics_json else {}
    except (ValueError, RecursionError):        # not JSON, or nested past the parser's depth
        report = {}
    report = report if isinstance(report, dict) else {}
    cached = report.get("kv_pages_cached")
    instance = report.get("instance")
    return dict(num_running=reply.num_running, num_waiting=reply.num_waiting, kv_pages_used=reply.kv_pages_used,
                kv_pages_cached=cached if _count(cached) else 0, kv_pages_total=reply.kv_pages_total,
                instance=instance if isinstance(instance, str) and instance else address)


def prefill_reports_by_instance(reports) -> dict[str, dict]:
    """Prefill workers' reports (``prefill_worker_report``) by their process's ``instance``, the last of each (a
    prefill worker that several decode workers share, once); one that is not an object is left out."""
    return {str(r.get("instance")): r for r in reports if isinstance(r, dict)}


def sum_prefill_reports(reports) -> dict:
    """The sums of prefill workers' reports, each process once (``prefill_reports_by_instance``); a value of another
    shape (a worker of another version) is left out of its sum."""
    unique = prefill_reports_by_instance(reports).values()
    return {k: sum(r[k] for r in unique if _count(r.get(k))) for k in PREFILL_GAUGE_KEYS}


def kv_layout(core) -> pb.KVLayout:
    """The layout of the KV blocks ``core`` (an ``EngineCore``, or a ``DisaggEngine``: its decode engine's) reads and
    writes."""
    core = getattr(core, "decode", core)
    spec = core.runner.kv_spec
    return pb.KVLayout(page_size=spec.page_size, num_layers=spec.num_layers,
                       num_kv_heads=core.model_config.num_kv_heads, head_dim=spec.head_dim,
                       dtype=str(jnp.dtype(spec.dtype)), vocab_size=core.model_config.vocab_size,
                       max_model_len=core.max_model_len)


_LAYOUT_FIELDS = (("page_size", "page size", "--page-size"), ("dtype", "KV pages' dtype", "--kv-cache-dtype (or --dtype)"),
                  ("max_model_len", "max model len", "--max-model-len"),
                  ("num_layers", "layers", None), ("num_kv_heads", "kv heads", None),
                  ("head_dim", "head dim", None), ("vocab_size", "vocabulary", None))


def layout_mismatch(mine: pb.KVLayout, wanted: pb.KVLayout) -> str | None:
    """Why blocks of layout ``mine`` cannot serve a worker that expects ``wanted`` (None: they can). The dtype must
    match too: a decode worker compiles its scatter for its own pages' dtype at warm-up, and nothing compiles while
    serving; and the max model len, which with the page size sets the blocks' page buckets (a prompt of 90 pages
    goes in a block of 128 under a limit of 2,048 tokens, of 100 under one of 1,600)."""
    diffs, flags = [], []
    for field, name, flag in _LAYOUT_FIELDS:
        a, b = getattr(mine, field), getattr(wanted, field)
        if a != b:
            diffs.append(f"{name} {a} here, {b} there")
            if flag:
                flags.append(flag)
    if not diffs:
        return None
    hint = f" (start both with the same {' and '.join(flags)})" if flags and len(flags) == len(diffs) else \
        " (another model)"
    return "KV layout differs: " + "; ".join(diffs) + hint


def params_to_json(p: SamplingParams) -> str:
    d = dataclasses.asdict(p)
    d["stop"] = list(d["stop"])
    d["stop_token_ids"] = list(d["stop_token_ids"])
    if d["logit_bias"] is not None:        # JSON's keys are strings: as [id, bias] pairs
        d["logit_bias"] = [[t, b] for t, b in d["logit_bias"].items()]
    return json.dumps(d)


def params_from_json(text: str) -> SamplingParams:
    """A request's sampling parameters from its ``params_json`` (SamplingParamsError naming ``params_json`` when
    it is not a JSON object of SamplingParams' fields; the fields' own checks name the field)."""
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise SamplingParamsError("params_json", f"not JSON ({e})") from None
    if not isinstance(fields, dict):
        raise SamplingParamsError("params_json", "expected a JSON object of sampling parameters")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(SamplingParams)})
    if unknown:
        raise SamplingParamsError("params_json", f"unknown sampling parameters: {', '.join(unknown)}")
    bias = fields.get("logit_bias")
    if bias is not None:
        if not (isinstance(bias, list) and all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], int)
                                               for x in bias)):
            raise SamplingParamsError("logit_bias", "expected [token id, bias] pairs")
        fields["logit_bias"] = {t: b for t, b in bias}
    try:
        return SamplingParams(**fields)
    except TypeError as e:
        raise SamplingParamsError("params_json", str(e)) from None


def logprobs_to_json(entries) -> str:
    if entries is None:
        return ""
    return json.dumps([{str(t): [lp.logprob, lp.rank] for t, lp in e.items()} for e in entries])


def logprobs_from_json(text: str):
    if not text:
        return None
    return [{int(t): Logprob(v[0], v[1]) for t, v in e.items()} for e in json.loads(text)]


def output_to_pb(out: RequestOutput) -> pb.GenerateResponse:
    comps = []
    for c in out.outputs:
        comps.append(pb.Completion(
            index=c.index, delta_token_ids=c.delta_token_ids, delta_text=c.delta_text,
            finish_reason=c.finish_reason or "", stop_reason_json=json.dumps(c.stop_reason),
            delta_logprobs_json=logprobs_to_json(c.delta_logprobs),
            cumulative_logprob=c.cumulative_logprob or 0.0))
    return pb.GenerateResponse(outputs=comps, finished=out.finished, num_cached_tokens=out.num_cached_tokens)


class OutputAccumulator:
    """Rebuilds the cumulative ``RequestOutput``s of one request from the increments it receives."""

    def __init__(self, request_id: str, prompt_ids: list[int], n: int, want_logprobs: bool):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.text = [""] * n
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs = [[] for _ in range(n)] if want_logprobs else None
        self.finish = [None] * n
        self.stop = [None] * n

    def add(self, msg: pb.GenerateResponse) -> RequestOutput:
        outs = []
        for c in msg.outputs:
            i = c.index
            self.text[i] += c.delta_text
            self.tokens[i].extend(c.delta_token_ids)
            delta_lps = logprobs_from_json(c.delta_logprobs_json)
            if self.logprobs is not None and delta_lps is not None:
                self.logprobs[i].extend(delta_lps)
            self.finish[i] = c.finish_reason or None
            self.stop[i] = json.loads(c.stop_reason_json) if c.stop_reason_json else None
            outs.append(CompletionOutput(
                i, self.text[i], list(self.tokens[i]), c.delta_text, list(c.delta_token_ids),
                c.cumulative_logprob if self.logprobs is not None else None,
                list(self.logprobs[i]) if self.logprobs is not None else None, delta_lps,
                self.finish[i], self.stop[i]))
        return RequestOutput(self.request_id, self.prompt_ids, outs, msg.finished, msg.num_cached_tokens)


# Failures: a refused request carries its parameter name; a failed one a message.
def refused_details(param: str, message: str) -> str:
    return json.dumps({"param": param, "message": message})


FAILED = grpc.StatusCode.INTERNAL
REFUSED = grpc.StatusCode.INVALID_ARGUMENT
DEAD = grpc.StatusCode.UNAVAILABLE
INCOMPATIBLE = grpc.StatusCode.FAILED_PRECONDITION   # a prefill worker of another KV layout (layout_mismatch)
