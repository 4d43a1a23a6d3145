"""RemotePrefillRole: the decode worker's view of prefill workers, as a ``DisaggEngine`` prefill role.

``submit`` sends the prompt to a prefill worker (round robin over those not recently
unreachable) in a ``Prefill`` call on a thread of its own; the reply's header carries the
first token, then the KV block comes either as byte chunks in the same stream (``grpc``) or
is pulled device to device with ``jax.experimental.transfer`` (``jax``) onto this worker's
first decode device. The block and token go to the sink as a ``Handoff``. A worker that cannot be
reached before it has answered (UNAVAILABLE before the header: nothing was computed there) is skipped
for ``UNREACHABLE_FOR_S`` and the next one tried; with none left the sink gets ``("local", request_id,
message)`` and the decode side computes the prompt itself. Each call names this worker's KV layout
(``expect``); a prefill worker of another (page size, KV dtype, model shape) refuses it before computing
anything, and is skipped for ``INCOMPATIBLE_FOR_S`` as an unreachable one is (a warning names the difference),
so a misconfigured prefill worker costs no request. Any other failure (a worker lost mid-reply,
refused, cancelled by time) goes as ``("error", request_id, message)``, so the decode side frees the
pages it reserved and ends the request with an error. A worker that stops answering its Health
(``HEALTH_MISSES`` in a row) is skipped, and the calls waiting on it are cancelled and tried elsewhere, so a
stopped prefill worker delays its prompts by seconds, not by the prefill timeout. ``abort`` cancels the
call, which aborts the prefill on the other side. A block pulled over the ``jax`` transport is waited for here,
not in the decode engine: one that never arrives (its worker stopped mid-transfer) fails its request at the prefill
timeout, or goes elsewhere once that worker stops answering its Health, and never stalls the engine's step.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.disagg.engine import Handoff
from serving.workers import worker_pb2 as pb
from serving.workers import worker_pb2_grpc as pb_grpc
from serving.workers.common import (CLIENT_CHANNEL_OPTIONS, INCOMPATIBLE, REFUSED, logprobs_from_json, params_to_json,
                                   prefill_worker_report, start_transfer_server)

UNREACHABLE_FOR_S = 5.0      # a worker that refused a connection is skipped this long
HEALTH_INTERVAL_S = 1.0      # each prefill worker's Health is asked this often ...
HEALTH_TIMEOUT_S = 3.0       # ... answered within this ...
HEALTH_MISSES = 2            # ... or, this many times in a row, it has stopped answering
INCOMPATIBLE_FOR_S = 60.0    # a worker of another KV layout is skipped this long (it may be restarted)
log = logging.getLogger("jaxdyn.worker")


class RemotePrefillRole:
    core = None

    def __init__(self, addresses: list[str], *, transport: str = "grpc", device=None,
                 transfer_host: str = "127.0.0.1", timeout_s: float = 120.0, expect: pb.KVLayout | None = None):
        if not addresses:
            raise ValueError("no prefill workers given")
        if transport not in ("grpc", "jax"):
            raise ValueError(f"kv transport {transport!r}: expected grpc or jax")
        self.addresses = list(addresses)
        self.transport = transport
        self.device = device or jax.devices()[0]
        self.timeout_s = timeout_s
        self.expect = expect                   # this worker's KV layout (``common.kv_layout``), sent with each call
        self.incompatible: dict[str, str] = {}  # address -> why its last refusal said the layouts differ
        self._channels = [grpc.insecure_channel(a, options=CLIENT_CHANNEL_OPTIONS) for a in self.addresses]
        self._stubs = [pb_grpc.WorkerStub(c) for c in self._channels]
        self._bad_until = [0.0] * len(self.addresses)
        self._rr = itertools.count()
        self._calls: dict[str, tuple] = {}     # request -> (its Prefill call, the worker), until delivered
        self._aborted: set[str] = set()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="jaxdyn-remote-prefill")
        self._transfer = None
        self._transfer_host = transfer_host
        self._connections: dict[str, object] = {}
        self.sink = None
        self.compiles_while_serving = 0
        self.computed_prefill_tokens = 0       # prompt tokens sent for remote prefill
        self.timings: dict[str, tuple[float, float]] | None = None   # benchmarks: {id: (header, block)}
        self._stalled: set[str] = set()        # requests whose call the health thread cancelled
        self._misses = [0] * len(self.addresses)
        self._reports: list[dict | None] = [None] * len(self.addresses)   # each healthy worker's last gauges
        self._stop = threading.Event()
        self._health = threading.Thread(target=self._health_loop, name="jaxdyn-prefill-health", daemon=True)
        self._health.start()

    @property
    def dead(self) -> str | None:
        """Set while every prefill worker is unreachable (or of another KV layout)."""
        now = time.monotonic()
        if all(t > now for t in self._bad_until):
            return self._none_reachable()
        return None

    def _none_reachable(self) -> str:
        known = dict(self.incompatible)
        why = [f"{a}: {known[a]}" for a in self.addresses if a in known]
        if why:
            return f"no compatible prefill worker reachable ({'; '.join(why)})"
        return f"no prefill worker reachable ({', '.join(self.addresses)})"

    def set_sink(self, sink) -> None:
        self.sink = sink

    def warmup(self, progress: bool = False) -> None:
        if self.transport == "jax":
            self._transfer_server()

    def submit(self, request_id, prompt_ids, params, priority=0, arrival_time=None) -> None:
        self.computed_prefill_tokens += len(prompt_ids)
        with self._lock:
            self._pending.add(request_id)
        self._pool.submit(self._run, request_id, list(prompt_ids), params, priority)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self._pending:
                return
            self._aborted.add(request_id)
            call = self._calls.pop(request_id, None)
        if call is not None:
            call[0].cancel()

    def shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            calls = [c for c, _ in self._calls.values()]
        for c in calls:
            c.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for ch in self._channels:
            ch.close()

    def _health_loop(self) -> None:
        """A prefill worker that stops answering its Health (stopped, hung, its host gone) is skipped, and the
        calls waiting on it are cancelled: their prompts go to another worker or are computed here, in seconds
        rather than at the prefill timeout. A busy worker still answers (its gRPC server runs apart from its
        engine)."""
        while not self._stop.wait(HEALTH_INTERVAL_S):
            for i, stub in enumerate(self._stubs):
                try:
                    reply = stub.Health(pb.HealthRequest(), timeout=HEALTH_TIMEOUT_S)
                    self._misses[i] = 0
                    self._reports[i] = self._report(i, reply)
                    continue
                except (grpc.RpcError, ValueError):        # ValueError: its channel closed by shutdown
                    if self._stop.is_set():
                        return
                self._misses[i] += 1
                if self._misses[i] >= HEALTH_MISSES:
                    self._reports[i] = None
                    self._bad_until[i] = max(self._bad_until[i], time.monotonic() + UNREACHABLE_FOR_S)
                    with self._lock:
                        waiting = {rid: c for rid, (c, j) in self._calls.items() if j == i}
                        self._stalled.update(waiting)
                        calls = list(waiting.values())
                    if waiting:
                        log.warning("prefill worker %s stopped answering: %d prompt(s) it held go elsewhere",
                                    self.addresses[i], len(waiting))
                    for c in calls:
                        c.cancel()

    def _report(self, i: int, reply) -> dict | None:
        """Worker ``i``'s gauges from its Health ``reply`` (None: not healthy, or a reply this misreads, logged: its
        gauges are lost, not the health checks)."""
        try:
            return prefill_worker_report(self.addresses[i], reply) if reply.healthy else None
        except Exception:   # noqa: BLE001
            log.exception("prefill worker %s: its Health reply's gauges could not be read", self.addresses[i])
            return None

    def worker_reports(self) -> list[dict]:
        """The prefill workers' queues and pages as their last Health replies gave them (``prefill_worker_report``),
        of those that answered healthy within the last checks (read every ``HEALTH_INTERVAL_S``)."""
        return [r for r in list(self._reports) if r is not None]

    def _pick(self, tried: set[int] = frozenset()) -> int | None:
        """The next worker in turn that is not skipped as unreachable nor in ``tried``: None when there is none
        (the first call of a request, ``tried`` empty, then takes the next in turn anyway)."""
        now = time.monotonic()
        n = len(self.addresses)
        start = next(self._rr)
        for k in range(n):
            i = (start + k) % n
            if self._bad_until[i] <= now and i not in tried:
                return i
        return None if tried else start % n

    def _run(self, rid: str, prompt_ids: list[int], params, priority: int) -> None:
        req = pb.PrefillRequest(request_id=rid, prompt_ids=prompt_ids, params_json=params_to_json(params),
                                priority=priority, kv_transport=self.transport, expect_kv=self.expect)
        tried: set[int] = set()
        try:
            while True:
                i = self._pick(tried)
                if i is None:            # every worker refused the connection: the decode side computes it
                    self.sink(("local", rid, self._none_reachable()))
                    return
                tried.add(i)
                if not self._attempt(i, rid, req):
                    return
        finally:
            with self._lock:
                self._calls.pop(rid, None)
                self._stalled.discard(rid)
                self._aborted.discard(rid)
                self._pending.discard(rid)

    def _attempt(self, i: int, rid: str, req) -> bool:
        """One Prefill call to worker ``i``; True when the worker could not be reached before it answered (the
        request may go to another), else False (delivered to the sink, or aborted)."""
        addr = self.addresses[i]
        answered = False
        t_call = time.monotonic()
        try:
            call = self._stubs[i].Prefill(req, timeout=self.timeout_s)
            with self._lock:
                if rid in self._aborted:
                    self._aborted.discard(rid)
                    call.cancel()
                    return False
                self._calls[rid] = (call, i)
            first = next(call)
            answered = True
            self.incompatible.pop(addr, None)
            t_header = time.perf_counter()
            h = first.header
            dtype = jnp.dtype(h.dtype)
            shape = tuple(h.shape)
            if h.transport == "jax":
                conn = self._connection(h.transfer_address)
                spec = jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(self.device))
                block = conn.pull(h.transfer_uuid, [spec])[0]
                if not self._arrived(block, rid, i, t_call + self.timeout_s):
                    aborted, stalled = self._call_ended(rid)
                    # aborted: the decode side knows; its worker stopped answering: another worker, or here
                    # (the health thread has logged which worker)
                    return stalled and not aborted
            else:
                buf = bytearray()
                for msg in call:
                    buf += msg.kv_chunk
                if len(buf) != h.nbytes:
                    raise RuntimeError(f"KV stream from {addr} ended after {len(buf)} of {h.nbytes} bytes")
                block = np.frombuffer(bytes(buf), dtype=dtype).reshape(shape)
            with self._lock:                # delivered: the health thread leaves it alone
                self._calls.pop(rid, None)
                self._stalled.discard(rid)
            if self.timings is not None:
                self.timings[rid] = (t_header, time.perf_counter())
            lps = logprobs_from_json(h.first_logprobs_json)
            self.sink(Handoff(rid, block, h.first_token, lps[0] if lps else None, h.num_cached_tokens,
                              time.monotonic()))
        except grpc.RpcError as e:
            code = e.code()
            aborted, stalled = self._call_ended(rid)
            if aborted:
                return False                # we cancelled it (abort): the decode side knows
            if code == grpc.StatusCode.CANCELLED and stalled:
                return True                 # the health thread did: nothing of it is used, another worker or here
            if code == INCOMPATIBLE and not answered:
                # refused before computing anything: another worker, or this one's own
                if self.incompatible.get(addr) != e.details():
                    log.warning("prefill worker %s is skipped for %.0f s: %s", addr, INCOMPATIBLE_FOR_S, e.details())
                self.incompatible[addr] = e.details()
                self._bad_until[i] = time.monotonic() + INCOMPATIBLE_FOR_S
                return True
            if code == grpc.StatusCode.UNAVAILABLE:
                if self._bad_until[i] <= time.monotonic():      # once a skip, not once a prompt
                    log.warning("prefill worker %s is unreachable (%s): skipped for %.0f s, its prompts go to "
                                "another prefill worker or are prefilled here", addr, e.details(), UNREACHABLE_FOR_S)
                self._bad_until[i] = time.monotonic() + UNREACHABLE_FOR_S
                if not answered:
                    return True             # nothing was computed there: another worker, or this one's own
            if code == REFUSED and not answered:
                # its own limits (a smaller KV pool) refused what this worker accepted: computed here
                self.sink(("local", rid, f"prefill worker {addr} refused it: {e.details()}"))
                return False
            self.sink(("error", rid, f"remote prefill on {addr} failed: {e.code().name}: {e.details()}"))
        except Exception as e:              # a malformed reply, a failed pull: this request fails
            self.sink(("error", rid, f"remote prefill on {addr} failed: {e!r}"))
        return False

    def _arrived(self, block, rid: str, i: int, deadline: float) -> bool:
        """Wait here, not in the engine, for a pulled block to arrive. ``pull`` returns at once with an array
        whose data come later; one that never comes (the prefill worker stopped or died mid-transfer) would stall
        the decode engine's step that reads it, and every request with it. True once it is here (raises if the
        transfer failed); False if the request was aborted, its worker stopped answering or this role was shut down
        meanwhile (the block is dropped); TimeoutError past the prefill timeout."""
        pause = 0.0002
        while not block.is_ready():
            with self._lock:
                if rid in self._aborted or rid in self._stalled or self._stop.is_set():
                    return False      # (shut down: its exit waited for the pull, up to the prefill timeout)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the KV block from {self.addresses[i]} did not arrive within the "
                                   f"{self.timeout_s:g} s prefill timeout")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        block.block_until_ready()           # a failed transfer raises here, in this request's thread
        return True

    def _call_ended(self, rid: str) -> tuple[bool, bool]:
        """A call that will deliver nothing: no longer in flight; (aborted by the client, cancelled by the health
        thread as its worker stopped answering)."""
        with self._lock:
            self._calls.pop(rid, None)
            aborted, stalled = rid in self._aborted, rid in self._stalled
            self._stalled.discard(rid)
        return aborted, stalled

    def _transfer_server(self):
        if self._transfer is None:
            self._transfer = start_transfer_server(self.device.client, self._transfer_host)
        return self._transfer

    def _connection(self, address: str):
        with self._lock:
            conn = self._connections.get(address)
            if conn is None:
                conn = self._connections[address] = self._transfer_server().connect(address)
        return conn
