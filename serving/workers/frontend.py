"""RemoteEngine: the OpenAI server's engine when the model runs in worker processes.

``jaxdyn serve --workers HOST:PORT,...`` serves the OpenAI API (``serving/app.py``, unchanged)
over ``RemoteEngine``, which has ``AsyncEngine``'s face: ``add_request`` / ``stream`` /
``generate`` / ``abort`` / ``is_healthy`` / ``num_unfinished`` and a ``core`` with the
tokenizer, limits, request checks and metrics the app reads.

* Each request goes, as one ``Generate`` stream, to the generate-capable worker (role
  ``decode`` or ``both``) with the fewest requests in flight among the healthy ones. Prefill
  workers are the decode workers' business (their ``--prefill-workers``).
* A health thread calls every worker's ``Health`` each ``health_interval`` seconds. A worker
  that fails ``max_missed`` checks in a row is unhealthy: its streams end with an error at once
  (they do not wait for TCP to notice) and new requests go to the others; it is used again
  when it answers again.
* Leaving a stream early (a client that disconnects) cancels the call, which aborts the
  request on the worker and, through it, on the prefill worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import types

import grpc

from jaxdyn.engine.async_engine import EngineDeadError, RequestFailedError, ShutdownError
from jaxdyn.engine.core import RequestError, check_request_ids, engine_eos_ids
from jaxdyn.engine.metrics import WORKER_FIELDS, EngineMetrics, set_worker_sums
from jaxdyn.engine.request import RequestOutput
from jaxdyn.engine.sampling_params import SamplingParams
from serving.workers import worker_pb2 as pb
from serving.workers import worker_pb2_grpc as pb_grpc
from serving.workers.common import (CLIENT_CHANNEL_OPTIONS, OutputAccumulator, params_to_json,
                                   prefill_reports_by_instance, sum_prefill_reports)

log = logging.getLogger("jaxdyn.frontend")
WAITING_NOTE_S = 10.0        # while no decode or both worker answers, say so this often

GENERATE_ROLES = ("decode", "both")


class _Worker:
    def __init__(self, address: str):
        self.address = address
        self.role: str | None = None
        self.healthy = False
        self.missed = 0
        self.max_model_len = 0
        self.max_num_seqs = 0
        self.vocab_size = 0
        self.kv_pages_used = self.kv_pages_total = self.num_waiting = 0     # its last Health reply's
        self.report: dict = {}      # its engine's counters, histograms and hidden gauges, as last reported
        self.retired: list[dict] = []   # the last reports of its earlier processes (restarted at this address)
        self.channel = grpc.insecure_channel(address, options=CLIENT_CHANNEL_OPTIONS)
        self.health_stub = pb_grpc.WorkerStub(self.channel)
        self._aio: dict[asyncio.AbstractEventLoop, tuple] = {}
        self.inflight: dict[str, "_RemoteStream"] = {}
        # bumped when the health check finds the worker back after it was lost: the requests' channels are then
        # made afresh (one that failed while the worker was down waits out gRPC's reconnect backoff, seconds to
        # minutes, and every request on it failed with "connection refused" while /health said 200)
        self.generation = 0

    def take_report(self, metrics_json: str) -> None:
        """A Health reply's metrics report as the last; one of another process (its ``instance``: the worker
        restarted) retires the last one, whose counts stay summed. A reply without one (a worker of an earlier
        version) leaves nothing live."""
        try:
            report = json.loads(metrics_json) if metrics_json else {}
        except (ValueError, RecursionError):         # not JSON, or nested past the parser's depth
            log.warning("worker %s sent metrics that are not JSON; its last ones are kept", self.address)
            return
        if not isinstance(report, dict):
            return
        if self.report and report.get("instance") != self.report.get("instance"):
            self.retired.append(self.report)
        self.report = report

    def stub(self) -> pb_grpc.WorkerStub:
        """An asyncio stub bound to the running loop (channels belong to one loop), of the worker's current
        ``generation``."""
        loop = asyncio.get_running_loop()
        entry = self._aio.get(loop)
        if entry is None or entry[2] != self.generation:
            if entry is not None:
                loop.create_task(entry[0].close())
            ch = grpc.aio.insecure_channel(self.address, options=CLIENT_CHANNEL_OPTIONS)
            entry = self._aio[loop] = (ch, pb_grpc.WorkerStub(ch), self.generation)
        return entry[1]


class _RemoteStream:
    def __init__(self, loop, request_id, prompt_ids, params, priority, worker):
        self.loop = loop
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.priority = priority
        self.worker = worker
        self.call = None
        self.started = False                       # ``RemoteEngine.stream`` has begun (its finally cleans up)
        self.failure: str | None = None
        self.error: type = RequestFailedError      # what ``failure`` ends the stream with
        self.arrival = time.monotonic()

    def fail(self, message: str, error: type = RequestFailedError) -> None:
        """From any thread: end this stream with an ``error`` now."""
        self.failure = message
        self.error = error
        if self.call is not None:
            self.loop.call_soon_threadsafe(self.call.cancel)


class FrontendCore:
    """The engine facts the OpenAI app reads, for an engine made of workers."""

    def __init__(self, tokenizer, model_config, max_model_len: int, max_num_seqs: int, prefill_gauges=None,
                 worker_counts=None):
        self.tokenizer = tokenizer
        # the app's /metrics readers (``RemoteEngine``'s): the prefill workers' gauges (``jaxdyn:prefill_role_*``),
        # the workers answering by role (``jaxdyn:workers``)
        self.prefill_gauges, self.worker_counts = prefill_gauges, worker_counts
        self.model_config = model_config
        self.max_model_len = max_model_len
        # the EOS ids the workers end sequences at (as their engines make them: the model's and the tokenizer's),
        # which min_tokens bans, for check_request
        self.eos_token_ids = engine_eos_ids(model_config, tokenizer)
        self.config = types.SimpleNamespace(max_num_seqs=max_num_seqs)
        # what the front end sees of its requests, and the workers' Health replies: their pages and queues, and
        # their engines' own counters (steps, prefix cache, KV transfers, remote prefills), summed
        self.metrics = EngineMetrics(collected=frozenset({
            "num_running", "num_waiting", "kv_usage", "kv_pages_used", "kv_pages_total", "prompt_tokens",
            "generation_tokens", "requests_finished", "ttft", "itl", "e2e", *WORKER_FIELDS}))
        self.num_pages = 0
        self.load_info: dict[str, float] = {}

    def check_request(self, prompt_ids, params: SamplingParams) -> None:
        """What can be refused here (``check_request_ids``: what needs no worker's pages); the worker checks the
        rest (its refusal a 400 too, or an error event in a stream already answered 200)."""
        check_request_ids(self, prompt_ids, params)
        if params.prompt_logprobs is not None:
            raise RequestError("prompt_logprobs", "prompt logprobs are not returned by workers (serve --workers); "
                               "a server with its own engine (serve, or serve --disagg) returns them")


class RemoteEngine:
    def __init__(self, addresses: list[str], *, tokenizer, model_config, health_interval: float = 0.5,
                 max_missed: int = 2, connect_timeout: float = 900.0):
        if not addresses:
            raise ValueError("no workers given")
        self.workers = [_Worker(a) for a in addresses]
        self.health_interval = health_interval
        self.max_missed = max_missed
        self._streams: dict[str, _RemoteStream] = {}
        self._stop = threading.Event()
        start = time.monotonic()
        noted = start
        while True:
            self._check_health()
            if self._live():
                break
            if all(w.role is not None and w.role not in GENERATE_ROLES for w in self.workers):
                raise ValueError(f"{', '.join(f'{w.address} is a {w.role} worker' for w in self.workers)}: --workers "
                                 "takes decode or both workers (a decode worker is given its prefill workers with "
                                 "--prefill-workers)")
            now = time.monotonic()
            if now > start + connect_timeout:
                raise ConnectionError(f"no decode or both worker answered within {connect_timeout:g} s: "
                                      f"{self._worker_states()}")
            if now - noted >= WAITING_NOTE_S:
                noted = now
                log.warning("waiting for a decode or both worker (%.0f of %g s): %s", now - start, connect_timeout,
                            self._worker_states())
            time.sleep(0.2)
        gen = self._live()
        bad = [w.address for w in gen if w.vocab_size != model_config.vocab_size]
        if bad:
            raise ValueError(f"workers {', '.join(bad)} serve a model with another vocabulary")
        self.core = FrontendCore(tokenizer, model_config, min(w.max_model_len for w in gen),
                                 sum(w.max_num_seqs for w in gen), prefill_gauges=self.prefill_gauges,
                                 worker_counts=self.worker_counts)
        self._thread = threading.Thread(target=self._health_loop, name="jaxdyn-health", daemon=True)
        self._thread.start()

    # ---- health ----------------------------------------------------------------------------------

    def _worker_states(self) -> str:
        return ", ".join(f"{w.address} " + ("unreachable" if w.role is None else
                                            f"{w.role}{'' if w.healthy else ' (unhealthy)'}") for w in self.workers)

    def _check_health(self) -> None:
        for w in self.workers:
            try:
                r = w.health_stub.Health(pb.HealthRequest(), timeout=max(self.health_interval, 1.0))
                w.missed = 0
                if r.healthy and not w.healthy:
                    w.generation += 1       # back (or first seen): requests get fresh channels
                w.role, w.healthy = r.role, r.healthy
                w.max_model_len, w.max_num_seqs, w.vocab_size = r.max_model_len, r.max_num_seqs, r.vocab_size
                w.kv_pages_used, w.kv_pages_total, w.num_waiting = r.kv_pages_used, r.kv_pages_total, r.num_waiting
                w.take_report(r.metrics_json)
            except grpc.RpcError:
                w.missed += 1
                if w.missed >= self.max_missed:
                    w.healthy = False
            if not w.healthy:
                for s in list(w.inflight.values()):
                    s.fail(f"worker {w.address} is unreachable")
        core = getattr(self, "core", None)
        if core is not None:        # the gauges: the healthy decode / both workers' pages and queues
            live = self._live()
            m = core.metrics
            m.kv_pages_used = sum(w.kv_pages_used for w in live)
            m.kv_pages_total = core.num_pages = sum(w.kv_pages_total for w in live)
            m.num_waiting = sum(w.num_waiting for w in live)
            try:
                set_worker_sums(m, [x for w in self.workers for x in (*w.retired, w.report)], [w.report for w in live])
            except Exception:   # noqa: BLE001 -- a report this misreads costs its metrics, not the health checks
                log.exception("summing the workers' metrics failed")

    def _live(self) -> list[_Worker]:
        """The decode and both workers answering their health checks."""
        return [w for w in self.workers if w.healthy and w.role in GENERATE_ROLES]

    def _prefill_reports(self) -> dict[str, dict] | None:
        """The prefill workers' last reports as the live decode workers passed them on, each process once
        (``prefill_reports_by_instance``); None where none of them has prefill workers (their reports carry no
        ``prefill_workers``)."""
        lists = [r for r in (w.report.get("prefill_workers") for w in self._live()) if isinstance(r, list)]
        return None if not lists else prefill_reports_by_instance(r for rs in lists for r in rs)

    def prefill_gauges(self) -> dict | None:
        """The sums of the prefill workers' queues and pages (``sum_prefill_reports``), or None (no prefill
        workers)."""
        reports = self._prefill_reports()
        return None if reports is None else sum_prefill_reports(reports.values())

    def worker_counts(self) -> dict:
        """The workers answering their health checks, by role: this front end's decode and both workers, and the
        prefill workers behind them as the decode workers last reported them."""
        live = self._live()
        return {"decode": sum(w.role == "decode" for w in live), "both": sum(w.role == "both" for w in live),
                "prefill": len(self._prefill_reports() or {})}

    def _health_loop(self) -> None:
        while not self._stop.wait(self.health_interval):
            self._check_health()

    @property
    def is_healthy(self) -> bool:
        return bool(self._live())

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    @property
    def num_unfinished_seqs(self) -> int:
        return sum(s.params.n for s in list(self._streams.values()))

    # ---- requests --------------------------------------------------------------------------------

    def add_request(self, prompt_ids, params: SamplingParams, request_id: str, *, priority: int = 0):
        if request_id in self._streams:
            raise RequestError("request_id", f"request id {request_id!r} is already in use")
        live = self._live()
        if not live:
            raise EngineDeadError("no worker is available")
        w = min(live, key=lambda w: len(w.inflight))
        s = _RemoteStream(asyncio.get_running_loop(), request_id, list(prompt_ids), params, priority, w)
        self._streams[request_id] = s
        w.inflight[request_id] = s
        self.core.metrics.num_running = len(self._streams)
        self.core.metrics.prompt_tokens += len(prompt_ids)
        return s

    async def stream(self, s: _RemoteStream):
        s.started = True
        m = self.core.metrics
        acc = OutputAccumulator(s.request_id, s.prompt_ids, s.params.n, s.params.logprobs is not None)
        finished = failed = refused = False
        first = last = None
        try:            # from here the stream's entries are dropped however it ends (the finally)
            req = pb.GenerateRequest(request_id=s.request_id, prompt_ids=s.prompt_ids,
                                     params_json=params_to_json(s.params), priority=s.priority)
            async with contextlib.aclosing(self._call(s, req)) as msgs:
                async for msg in msgs:
                    out: RequestOutput = acc.add(msg)
                    now = time.monotonic()
                    m.generation_tokens += sum(len(c.delta_token_ids) for c in out.outputs)
                    if first is None:
                        first = now
                        m.ttft.observe(now - s.arrival)
                    elif last is not None:
                        m.itl.observe(now - last)
                    last = now
                    if out.finished:
                        finished = True
                        m.e2e.observe(now - s.arrival)
                        for c in out.outputs:
                            m.requests_finished[c.finish_reason] = m.requests_finished.get(c.finish_reason, 0) + 1
                    yield out
                    if finished:
                        return
            failed = True
            raise s.error(s.failure or f"worker {s.worker.address} ended the stream early")
        except grpc.aio.AioRpcError as e:
            err = _translate(e, s)
            refused = isinstance(err, RequestError)     # the client's request: not counted, as the engine does not
            failed = not refused
            raise err from None
        except asyncio.CancelledError:
            if s.failure is not None:          # the health thread cancelled it: the worker is gone
                failed = True
                raise s.error(s.failure) from None
            raise
        finally:
            self._streams.pop(s.request_id, None)
            s.worker.inflight.pop(s.request_id, None)
            if not finished and s.call is not None:
                s.call.cancel()                # the worker aborts the request (and its prefill)
            if not finished and not refused:
                # by sequence, as the engine counts: those that had ended by their reason, the rest as failed
                # (the worker or the stream was lost) or aborted (the client left)
                for reason in acc.finish:
                    reason = reason or ("error" if failed else "abort")
                    m.requests_finished[reason] = m.requests_finished.get(reason, 0) + 1
            m.num_running = len(self._streams)

    async def _call(self, s: _RemoteStream, req):
        """The worker's replies to ``req``. A worker that cannot be reached before its first reply (it died or
        stopped; nothing was computed) is marked down at once, and the request goes once to another live worker:
        until its health checks had failed, a dead worker with nothing in flight took most new requests, each
        failing with a 500 while another worker was up."""
        for attempt in range(2):
            s.call = s.worker.stub().Generate(req)
            if s.failure is not None:
                s.call.cancel()
            replied = False
            try:
                async for msg in s.call:
                    replied = True
                    yield msg
                return
            except grpc.aio.AioRpcError as e:
                if (attempt or replied or s.failure is not None or e.code() != grpc.StatusCode.UNAVAILABLE
                        or not self._reroute(s)):
                    raise

    def _reroute(self, s: _RemoteStream) -> bool:
        """Mark ``s``'s worker down (its next health check that answers brings it back, on fresh channels) and move
        ``s`` to the live worker with the fewest requests in flight; False where there is none."""
        w = s.worker
        w.missed = max(w.missed, self.max_missed)
        w.healthy = False
        others = [x for x in self._live() if x is not w]
        if not others:
            return False
        w.inflight.pop(s.request_id, None)
        s.worker = min(others, key=lambda x: len(x.inflight))
        s.worker.inflight[s.request_id] = s
        log.warning("worker %s is unreachable: marked down; request %s goes to %s", w.address, s.request_id,
                    s.worker.address)
        return True

    def fail_unfinished(self, message: str) -> int:
        """End every stream in flight with an error (``StreamingEngine.fail_unfinished``); returns how many."""
        streams = list(self._streams.values())
        for s in streams:
            s.fail(message, ShutdownError)
        return len(streams)

    async def generate(self, prompt_ids, params: SamplingParams, request_id: str, *, priority: int = 0):
        s = self.add_request(prompt_ids, params, request_id, priority=priority)
        async with contextlib.aclosing(self.stream(s)) as outs:     # leaving early cancels the call now
            async for out in outs:
                yield out

    def abort(self, request_id: str) -> None:
        s = self._streams.get(request_id)
        if s is None:
            return
        if s.call is not None:
            s.loop.call_soon_threadsafe(s.call.cancel)
        elif not s.started:         # added, never streamed (nothing runs on a worker): its entries go now
            self._streams.pop(request_id, None)
            s.worker.inflight.pop(request_id, None)
            self.core.metrics.num_running = len(self._streams)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for w in self.workers:
            w.channel.close()


def _translate(e: grpc.aio.AioRpcError, s: _RemoteStream) -> Exception:
    if s.failure is not None:
        return RequestFailedError(s.failure)
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        try:
            d = json.loads(details)
            return RequestError(d["param"], d["message"])
        except (ValueError, KeyError):
            return RequestError("request", details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return RequestFailedError(f"worker {s.worker.address} is unreachable: {details}")
    return RequestFailedError(f"worker {s.worker.address}: {details or code.name}")
