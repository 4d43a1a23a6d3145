"""A jaxdyn worker process: one role's gRPC service (``worker.proto``) over its engine.

* ``prefill``: ``Prefill`` streams a prompt's first token and KV block back -- as 4 MiB byte
  chunks in the same stream (``kv_transport="grpc"``), or as a handle the caller pulls device
  to device with ``jax.experimental.transfer`` (``"jax"``). A cancelled call aborts the prefill.
* ``decode``: ``Generate`` streams a request's output increments; prompts go to the prefill
  workers given at start (``RemotePrefillRole``) or stay local as the disaggregation policy
  decides. A cancelled call aborts the request on both roles.
* ``both``: ``Generate`` on an aggregated engine (every prompt prefilled locally).

All roles serve ``Abort`` and ``Health``.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import logging
import threading
import time
import uuid

import grpc
import jax
import numpy as np

from jaxdyn.disagg.engine import Handoff, LocalPrefillRole
from jaxdyn.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from jaxdyn.engine.core import RequestError
from jaxdyn.engine.metrics import worker_report
from jaxdyn.engine.sampling_params import SamplingParamsError
from serving.workers import worker_pb2 as pb
from serving.workers import worker_pb2_grpc as pb_grpc
from serving.workers.common import (
    CHANNEL_OPTIONS, DEAD, FAILED, INCOMPATIBLE, KV_CHUNK_BYTES, REFUSED, host_port, kv_layout, layout_mismatch,
    logprobs_to_json, output_to_pb, params_from_json, refused_details, start_transfer_server)

log = logging.getLogger("jaxdyn.worker")
ROLES = ("prefill", "decode", "both")
# How long a block offered over the jax transport waits for its pull when the call has no deadline of its own (the
# decode side's calls carry one: its prefill timeout). A block not pulled by then is withdrawn, its copy freed.
OFFER_TIMEOUT_S = 300.0
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


async def _checked_params(core, request, context):
    """The request's sampling parameters, checked with its prompt by ``core`` (``check_request``); a request either
    refuses is aborted with REFUSED and the parameter it names."""
    try:
        params = params_from_json(request.params_json)
        core.check_request(list(request.prompt_ids), params)
    except SamplingParamsError as e:
        await context.abort(REFUSED, refused_details(e.param, str(e).split(": ", 1)[-1]))
    except RequestError as e:
        await context.abort(REFUSED, refused_details(e.param, str(e)))
    return params


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, role: str, model_name: str, *, engine: AsyncEngine | None = None,
                 prefill: LocalPrefillRole | None = None, transfer_host: str = "127.0.0.1"):
        if role not in ROLES:
            raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        self.role, self.model_name = role, model_name
        self.engine, self.prefill = engine, prefill
        self._waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._uuids = itertools.count(1)
        self.instance = uuid.uuid4().hex     # this process, in its metrics reports: a front end sees a restart
        self._transfer = None
        self._transfer_host = transfer_host.strip("[]")      # (bracketed again where an address is made)
        if prefill is not None:
            prefill.set_sink(self._deliver)

    @property
    def core(self):
        return self.engine.core if self.engine is not None else self.prefill.core

    # ---- Generate (decode, both) -----------------------------------------------------------------

    async def Generate(self, request, context):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this is a prefill worker: use Prefill")
        params = await _checked_params(self.engine.core, request, context)
        try:
            stream = self.engine.add_request(list(request.prompt_ids), params, request.request_id,
                                             priority=request.priority)
        except RequestError as e:
            await context.abort(REFUSED, refused_details(e.param, str(e)))
        except EngineDeadError as e:
            await context.abort(DEAD, str(e))
        failure = None
        try:
            async for out in self.engine.stream(stream):     # leaving early (cancel) aborts it
                yield output_to_pb(out)
        except RequestError as e:
            failure = (REFUSED, refused_details(e.param, str(e)))
        except RequestFailedError as e:
            failure = (FAILED, str(e))
        except EngineDeadError as e:
            failure = (DEAD, str(e))
        if failure is not None:
            await context.abort(*failure)

    # ---- Prefill (prefill) -----------------------------------------------------------------------

    def _deliver(self, item) -> None:
        """The prefill role's sink (its thread): route a handoff or an error to its call."""
        rid = item.request_id if isinstance(item, Handoff) else item[1]
        with self._lock:
            targets = list(self._waiters.values()) if rid == "*" else [self._waiters.get(rid)]
        for t in targets:
            if t is not None:
                t[0].call_soon_threadsafe(t[1].put_nowait, item)

    async def Prefill(self, request, context):
        if self.prefill is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"this is a {self.role} worker: no Prefill")
        if self.prefill.dead is not None:
            await context.abort(DEAD, f"the prefill engine died: {self.prefill.dead!r}")
        if request.kv_transport not in ("grpc", "jax"):
            await context.abort(REFUSED, refused_details("kv_transport", "expected grpc or jax"))
        if request.kv_transport == "jax" and self._transfer_host in WILDCARD_HOSTS:
            # its transfer server would advertise 0.0.0.0 / ::, where a decode worker finds only itself (its pull
            # then waits out the prefill timeout): skipped by the decode side, which prefills elsewhere
            await context.abort(INCOMPATIBLE, f"this prefill worker listens on {self._transfer_host!r}, no address a "
                                              f"decode worker can pull KV from over the jax transport: start it with "
                                              f"--host set to its own address, or use --kv-transport grpc")
        if request.HasField("expect_kv"):      # before anything is computed or reserved
            why = layout_mismatch(kv_layout(self.prefill.core), request.expect_kv)
            if why is not None:
                await context.abort(INCOMPATIBLE, why)
        rid = request.request_id
        params = await _checked_params(self.prefill.core, request, context)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._waiters:
                await context.abort(REFUSED, refused_details("request_id", f"{rid!r} is already in use"))
            self._waiters[rid] = (loop, q)
        if self.prefill.dead is not None:
            # died since the check above: its last word went to the waiters there were, not this one (whose call
            # would have waited out its deadline)
            with self._lock:
                self._waiters.pop(rid, None)
            await context.abort(DEAD, f"the prefill engine died: {self.prefill.dead!r}")
        done = False
        try:
            self.prefill.submit(rid, list(request.prompt_ids), params, request.priority, time.monotonic())
            item = await q.get()
            done = True
        finally:
            with self._lock:
                self._waiters.pop(rid, None)
            if not done:                  # cancelled by the caller: the prefill stops too
                self.prefill.abort(rid)
        if not isinstance(item, Handoff):
            await context.abort(FAILED, item[2])
        lps = ""
        if item.first_logprobs is not None:
            lps = logprobs_to_json([item.first_logprobs])
        header = pb.PrefillHeader(first_token=item.first_token, first_logprobs_json=lps,
                                  num_cached_tokens=item.num_cached_tokens, shape=list(item.block.shape),
                                  dtype=str(item.block.dtype), transport=request.kv_transport,
                                  nbytes=int(item.block.nbytes))
        if request.kv_transport == "jax":
            if context.cancelled():       # the caller left (aborted, or gave up on this worker): nothing to offer
                return
            # One device's copy: a pull must name the same shards the server offers, and the
            # caller's mesh may have another TP degree; it reshards on its own devices.
            arr = jax.device_put(item.block, self.prefill.core.runner.mesh.devices.flat[0])
            header.transfer_uuid = next(self._uuids)
            header.transfer_address = self._transfer_address()
            # Offered until the caller's deadline (its wait for the block ends there too): a block never pulled (the
            # caller cancelled after the result was in, failed before its pull, or died) was held for good.
            left = context.time_remaining()
            wait_s = OFFER_TIMEOUT_S if left is None else max(min(left, OFFER_TIMEOUT_S), 0.0)
            self._transfer_server().await_pull(
                header.transfer_uuid, [arr], timeout=datetime.datetime.now() + datetime.timedelta(seconds=wait_s))
            yield pb.PrefillReply(header=header)
            return
        host = await loop.run_in_executor(None, lambda: np.ascontiguousarray(jax.device_get(item.block)))
        yield pb.PrefillReply(header=header)
        view = memoryview(host.reshape(-1).view(np.uint8))
        for i in range(0, len(view), KV_CHUNK_BYTES):
            yield pb.PrefillReply(kv_chunk=bytes(view[i:i + KV_CHUNK_BYTES]))

    def _transfer_server(self):
        if self._transfer is None:
            self._transfer = start_transfer_server(self.prefill.core.runner.mesh.devices.flat[0].client,
                                                   self._transfer_host)
        return self._transfer

    def _transfer_address(self) -> str:
        """Where decode workers reach the transfer server: this worker's host and the server's port (the server
        reports 0.0.0.0 for a host given by name)."""
        port = int(self._transfer_server().address().rsplit(":", 1)[1])
        return host_port(self._transfer_host, port)

    # ---- Abort, Health ---------------------------------------------------------------------------

    async def Abort(self, request, context):
        rid = request.request_id
        found = False
        if self.engine is not None:
            found = rid in self.engine._streams
            self.engine.abort(rid)
        if self.prefill is not None:
            with self._lock:
                found = found or rid in self._waiters
            self.prefill.abort(rid)
        return pb.AbortReply(found=found)

    async def Health(self, request, context):
        core = self.core
        local = getattr(core, "decode", core)         # the EngineCore whose pages these are
        if self.engine is not None:
            healthy = self.engine.is_healthy
            error = "" if healthy else repr(self.engine.dead)
        else:
            healthy = self.prefill.dead is None
            error = "" if healthy else repr(self.prefill.dead)
        g = local.gauges()
        report = {**worker_report(core.metrics), "kv_pages_cached": g["kv_pages_cached"], "instance": self.instance}
        remote = getattr(core, "role", None)
        if hasattr(remote, "worker_reports"):       # a decode worker's prefill workers, for a front end's gauges
            report["prefill_workers"] = remote.worker_reports()
        return pb.HealthReply(healthy=healthy, role=self.role, model=self.model_name,
                              num_running=g["num_running"], num_waiting=g["num_waiting"],
                              max_model_len=core.max_model_len, max_num_seqs=core.config.max_num_seqs,
                              error=error, kv_pages_used=g["kv_pages_used"], kv_pages_total=g["kv_pages_total"],
                              vocab_size=core.model_config.vocab_size, kv_layout=kv_layout(core),
                              metrics_json=json.dumps(report))


async def serve_worker(service: WorkerService, host: str, port: int, ready=None, stop: asyncio.Event | None = None):
    """Run the gRPC server until ``stop`` is set (or forever); ``ready(port)`` once it listens."""
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    pb_grpc.add_WorkerServicer_to_server(service, server)
    address = host_port(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:           # grpc's "Failed to bind" (older versions return 0 instead)
        raise OSError(f"cannot listen on {address}: {e}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    if ready is not None:
        ready(bound)
    try:
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        await server.stop(grace=5)
