"""AsyncEngine: the engine core on a background thread, streamed to asyncio consumers.

``async for out in engine.generate(prompt_ids, params, request_id)`` yields a
RequestOutput per step that produced something for the request (cumulative
text and tokens, plus the delta since the previous one); a consumer that has
fallen behind gets what arrived meanwhile folded into one output (the deltas
joined, ``merge_outputs``), so a loaded server writes one chunk per request per
wake-up instead of one per token. Leaving the loop
early (a client that disconnects) aborts the request. ``abort(request_id)``
works from any coroutine. If a step raises, the engine is dead: every stream
ends with ``EngineDeadError`` and ``is_healthy`` turns false.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import traceback

from jaxdyn.engine.core import EngineCore
from jaxdyn.engine.request import RequestOutput, merge_outputs
from jaxdyn.engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    pass


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (e.g. its remote prefill); the engine lives on."""


class ShutdownError(EngineDeadError):
    """The server is stopping and its grace period ran out before this request finished (``fail_unfinished``)."""


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.request_id = ""
        self.n = 1                           # its sequences (the request's n)
        self.prompt_ids: list[int] = []
        self.acc: dict = {}                  # ProcessEngine: each completion's text / tokens / logprobs so far
        self.detok: dict | None = None       # ProcessEngine: each completion's detokenizer, when decoded here
        self.skip_special_tokens = True      # ProcessEngine: the request's, for those detokenizers
        self.include_stop = False            # ProcessEngine: the request's include_stop_str_in_output, likewise
        self.prompt_logprobs = None          # ProcessEngine: the request's prompt logprobs, once they came
        self.closed = False                  # its consumer left: what still comes is dropped (``stream``)
        self.queue: asyncio.Queue = asyncio.Queue()


def _put_all(items: list) -> None:
    """On the event loop: hand each (stream, item) of one engine step to its stream."""
    for stream, item in items:
        stream.queue.put_nowait(item)


def _post(pending: dict) -> None:
    """Send what the engine thread gathered (a step's outputs, a command's errors) to their event loops: one
    thread-safe call per loop, not per request (each such call wakes the loop through a pipe; at 512 requests
    one per request cost 3.3-110 ms of the engine thread a step in runs on a 2-core CPU, one per step
    0.07-0.3 ms: ``benchmarks/stream_delivery.py``)."""
    for loop, items in pending.items():
        if not loop.is_closed():    # a closed loop's consumers are gone (a server stopped before its engine)
            loop.call_soon_threadsafe(_put_all, items)


def apply_command(core, cmd, wire: bool = False):
    """Run an ``("add", id, prompt ids, params, priority, arrival)`` or ``("abort", id)`` command on the core:
    (request id, its refusal or its final output) when there is one to deliver, else None. ``wire``: the
    abort's output as ``EngineCore.step(wire=True)`` lays it out (the engine process)."""
    if cmd[0] == "add":
        _, rid, prompt, params, priority, arrival = cmd
        try:
            core.add_request(rid, prompt, params, priority=priority, arrival_time=arrival)
        except ValueError as e:
            return rid, e
        return None
    out = core.abort(cmd[1], wire=True) if wire else core.abort(cmd[1])
    return None if out is None else (cmd[1], out)


class CommandThread:
    """An engine loop on a daemon thread of its own, fed commands through a queue: ``_start`` starts ``_loop``,
    ``_send`` queues a command and wakes the loop, ``_taken`` gives the loop what was queued since (the wake-up
    cleared first, so a command sent meanwhile wakes the next wait), ``shutdown`` stops the loop (within 10 s).
    ``AsyncEngine``'s loop and the disaggregated engine's local prefill role (``jaxdyn.disagg.engine``)."""

    def _start(self, name: str) -> None:
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _send(self, cmd) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def _taken(self) -> list:
        self._wake.clear()
        taken = []
        while True:
            try:
                taken.append(self._commands.get_nowait())
            except queue.Empty:
                return taken


class StreamingEngine:
    """The consumer side shared by the engine on a thread (``AsyncEngine``) and the engine in its own process
    (``jaxdyn.engine.process.ProcessEngine``): streams by request id, folding, abort on early exit. A
    subclass provides ``core`` (what the server reads: config, tokenizer, check_request, metrics),
    ``is_healthy`` and ``_send`` (a command to the engine loop: ``("add", ...)`` or ``("abort", id)``)."""

    def __init__(self, max_queued_requests: int | None):
        self.max_queued_requests = max_queued_requests
        self._streams: dict[str, _Stream] = {}
        self.dead: BaseException | None = None

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    @property
    def num_unfinished_seqs(self) -> int:
        """The unfinished requests' sequences (their n summed). ``list`` copies the streams at once: the
        engine thread unregisters finished ones meanwhile."""
        return sum(s.n for s in list(self._streams.values()))

    def add_request(self, prompt_ids, params: SamplingParams, request_id: str, *, priority: int = 0) -> _Stream:
        """Submit now (call from the event loop); iterate the result with ``stream()``."""
        if self.dead is not None:
            raise self._dead_error()
        if request_id in self._streams:
            from jaxdyn.engine.core import RequestError
            raise RequestError("request_id", f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop())
        stream.request_id = request_id
        prompt_ids = list(prompt_ids)
        stream.prompt_ids = prompt_ids
        stream.n = params.n
        params = self._prepare(stream, params)
        self._streams[request_id] = stream
        if self.dead is not None:   # died or shut down since the check above, after its streams were failed
            self._streams.pop(request_id, None)
            raise self._dead_error()
        self._send(("add", request_id, prompt_ids, params, priority, time.monotonic()))
        return stream

    def _dead_error(self) -> EngineDeadError:
        if isinstance(self.dead, ShutdownError):
            return ShutdownError(str(self.dead))
        return EngineDeadError(f"the engine died: {self.dead!r}")

    def _prepare(self, stream: _Stream, params: SamplingParams) -> SamplingParams:
        """The params the engine gets for a new request's ``stream`` (before it is sent); as given here."""
        return params

    async def stream(self, stream: _Stream):
        """The outputs of a submitted request; leaving early aborts it."""
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                while isinstance(item, RequestOutput) and not item.finished and not stream.queue.empty():
                    nxt = stream.queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        yield item                    # what came before the error, then the error
                        item = nxt
                        break
                    item = merge_outputs(item, nxt)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            # the request's last item unregistered it (``_deliver``); a later request may hold its id since
            if self._streams.get(stream.request_id) is stream:
                if finished:
                    self._streams.pop(stream.request_id, None)
                else:
                    # the consumer left: the id stays taken until the abort's final output comes back (``_deliver``
                    # unregisters it then), so a request that reuses the id meanwhile is refused rather than handed
                    # the old request's outputs and its end
                    stream.closed = True
                    self._send(("abort", stream.request_id))

    async def generate(self, prompt_ids, params: SamplingParams, request_id: str, *, priority: int = 0):
        s = self.add_request(prompt_ids, params, request_id, priority=priority)
        # closed with this generator: a caller that leaves early aborts the request now, not when the inner
        # generator is collected
        async with contextlib.aclosing(self.stream(s)) as outs:
            async for out in outs:
                yield out

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _deliver(self, out: RequestOutput | BaseException, request_id: str, pending: dict) -> None:
        """Gather ``out`` for the request's stream in ``pending`` (by event loop), for ``_post``."""
        if isinstance(out, RequestOutput) and out.error is not None:
            out = RequestFailedError(out.error)
        # The last item of a request unregisters it here, so a stream nobody reads cannot leak.
        last = isinstance(out, BaseException) or out.finished
        s = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if s is not None and not s.closed:
            pending.setdefault(s.loop, []).append((s, out))

    def fail_unfinished(self, message: str) -> int:
        """End every unfinished request's stream with ``ShutdownError(message)`` and abort it in the engine: a
        server whose shutdown grace is running out, so that its streams end with an error event rather than cut
        off. Call from the event loop; returns how many requests it ended."""
        rids = [rid for rid, s in list(self._streams.items()) if not s.closed]   # a closed one's abort was sent
        self._fail_all(ShutdownError(message), {})
        for rid in rids:
            self._send(("abort", rid))
        return len(rids)

    def _fail_all(self, err: BaseException, pending: dict) -> None:
        for rid in list(self._streams):
            self._deliver(err, rid, pending)
        _post(pending)


class AsyncEngine(StreamingEngine, CommandThread):
    """The engine core driven by a thread of this process."""

    def __init__(self, core: EngineCore, *, max_queued_requests: int | None = None):
        super().__init__(max_queued_requests)
        self.core = core
        self._start("jaxdyn-engine")

    @property
    def is_healthy(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    # ---- engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        core = self.core
        pending: dict = {}     # this turn's outputs and errors, in order, sent to the loops at its end
        try:
            while not self._stop:
                for cmd in self._taken():
                    done = apply_command(core, cmd)
                    if done is not None:
                        self._deliver(done[1], done[0], pending)
                busy = core.has_unfinished()
                if busy:
                    for out in core.step():
                        self._deliver(out, out.request_id, pending)
                _post(pending)
                pending = {}
                if not busy:
                    self._wake.wait(0.05)
            stop = getattr(core, "shutdown", None)
            if stop is not None:
                stop()
        except BaseException as e:  # the engine is dead: tell everyone, keep the reason
            self.dead = e
            traceback.print_exc()
            core.metrics = core.metrics.of_a_dead_engine()
            # after what this turn gathered before it died
            self._fail_all(EngineDeadError(f"the engine died: {e!r}"), pending)
        else:
            # shut down with requests in flight (a server's grace period fails them first): they end with an
            # error, and later ones are refused, instead of waiting for outputs that never come
            self.dead = ShutdownError("the engine was shut down")
            self._fail_all(self.dead, {})
