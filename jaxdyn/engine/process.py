"""ProcessEngine: the engine core alone in its own process, streamed to asyncio consumers.

vLLM V1's split. With the engine on a thread of the server's process (``AsyncEngine``), the engine loop
shares one interpreter lock with the HTTP event loop: every output a step makes costs the event loop
its SSE framing, JSON and socket writes, and while the event loop holds the lock the engine loop cannot
build and dispatch the next step, so the device waits on the server's Python. Here the engine loop runs
in a child process (``multiprocessing`` spawn: the child owns the accelerator; the server process never
initialises a JAX backend) and the two exchange one message per engine step:

- server → engine: the commands gathered since the last message (``add`` with the prompt ids, sampling
  params, priority and arrival time; ``abort``; ``shutdown``), sent by a thread so the event loop never
  blocks on the pipe;
- engine → server: every output of one step as its deltas only (text, token ids, logprobs, finish), a
  refused ``add`` as its error, and a snapshot of the engine's metrics whenever a request finished, the
  engine went idle, or 0.25 s passed. A reader thread rebuilds each request's cumulative text and tokens
  (``_Stream.acc``) and hands the step to the event loops in one call per loop, as ``AsyncEngine`` does.

Text is decoded on the server's side, as vLLM V1's front end does, for every request that no stop string
can end (``ProcessEngine._prepare``: the engine gets it with ``detokenize=False`` and the reader thread runs
its ``IncrementalDetokenizer``s): a decode step's host time in the engine process is then its own
bookkeeping only (the detokenizer was ~30 % of it at 512 running requests, ``benchmarks/engine_host_time.py``).
A request with stop strings is decoded in the engine, which must see its text to stop it.

The server reads the core through ``EngineFacts`` (config, model config, tokenizer, limits, load info,
the latest metrics, ``check_request``), sent once when the engine is ready. An engine that dies (an
exception in a step, a killed process) ends every stream with ``EngineDeadError`` and turns
``is_healthy`` false; a server that dies closes the pipe and the engine process exits.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import queue
import threading
import time
import traceback

from jaxdyn.engine.async_engine import (EngineDeadError, RequestFailedError, ShutdownError, StreamingEngine, _post,
                                       apply_command)
from jaxdyn.engine.boot import start_engine_process
from jaxdyn.engine.core import EngineConfig, RequestError, check_request
from jaxdyn.engine.detokenizer import IncrementalDetokenizer
from jaxdyn.engine.request import CompletionOutput, RequestOutput, TextPrefix, TokenPrefix, append_piece

log = logging.getLogger(__name__)

METRICS_INTERVAL_S = 0.25       # the longest a busy engine goes without sending its metrics


class EngineStartError(RuntimeError):
    """The engine process could not build its engine (the message says why), or exited before it was ready."""


@dataclasses.dataclass
class EngineFacts:
    """What the server reads of a core in another process (``AsyncEngine.core``'s face); ``metrics`` is
    replaced by each snapshot the engine sends."""

    config: EngineConfig
    model_config: object
    tokenizer: object
    max_model_len: int
    num_pages: int
    eos_token_ids: tuple[int, ...]
    load_info: dict
    metrics: object

    @classmethod
    def of(cls, core) -> "EngineFacts":
        return cls(config=core.config, model_config=core.model_config, tokenizer=core.tokenizer,
                   max_model_len=core.max_model_len, num_pages=core.num_pages, eos_token_ids=core.eos_token_ids,
                   load_info=dict(core.load_info), metrics=core.metrics)

    def check_request(self, prompt_ids, params) -> None:
        check_request(self, prompt_ids, params)


def _dumps(msg) -> bytes:
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


# ---- the engine process ---------------------------------------------------------------------------


def _apply(core, cmd, items: list) -> bool:
    """Run one command on the core, its refusal or final output into ``items``; False for ``shutdown``."""
    if cmd[0] == "shutdown":
        return False
    done = apply_command(core, cmd, wire=True)
    if done is not None:
        rid, out = done
        items.append(("e", rid, getattr(out, "param", None), str(out)) if isinstance(out, ValueError)
                     else ("o", out))
    return True


def engine_loop(conn, core) -> None:
    """The engine process's loop over ``core`` (an EngineCore: its ``step(wire=True)``). Its messages are
    written by a thread: a server that reads late (its interpreter busy with HTTP) never blocks a step on
    the pipe; it reads the backlog later, and its streams fold what piled up."""
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    broken: list[BaseException] = []

    def write() -> None:
        while (data := outbox.get()) is not None:
            try:
                conn.send_bytes(data)
            except OSError as e:          # the server is gone: the loop stops at its next turn
                broken.append(e)
                return

    writer = threading.Thread(target=write, name="jaxdyn-engine-write", daemon=True)
    writer.start()
    try:
        _loop(conn, core, outbox, broken)
    finally:
        outbox.put(None)
        writer.join(10)


def _loop(conn, core, outbox: queue.SimpleQueue, broken: list) -> None:
    last_metrics = time.monotonic()
    running = True
    while running:
        if broken:
            raise BrokenPipeError(f"the server is gone: {broken[0]!r}")
        items: list = []
        timeout = 0 if core.has_unfinished() else None     # idle: sleep until a command (or the pipe closes)
        while running and conn.poll(timeout):
            for cmd in pickle.loads(conn.recv_bytes())[1]:
                if not _apply(core, cmd, items):
                    running = False
                    break
            timeout = 0
        finished = any(it[0] == "o" and it[1][1] for it in items)
        busy = running and core.has_unfinished()
        if busy:
            outs = core.step(wire=True)
            items.extend(("o", w) for w in outs)
            finished = finished or any(w[1] for w in outs)
        now = time.monotonic()
        snapshot = None
        if finished or not busy or now - last_metrics >= METRICS_INTERVAL_S:
            snapshot, last_metrics = core.metrics, now
        if items or snapshot is not None:
            outbox.put(_dumps(("out", items, snapshot)))
    stop = getattr(core, "shutdown", None)
    if stop is not None:
        stop()


def out_of_device_memory(e: BaseException) -> str | None:
    """What ``jaxdyn serve`` / ``worker`` say of an engine build that ran out of device memory (XLA's
    RESOURCE_EXHAUSTED): its first line and the settings that change what the build takes; None for any other
    error."""
    from jax.errors import JaxRuntimeError
    text = str(e).strip()
    if not isinstance(e, JaxRuntimeError) or "RESOURCE_EXHAUSTED" not in text:
        return None
    return (f"out of device memory while building the engine ({text.splitlines()[0][:300]}): give the KV cache "
            "fewer pages (--num-pages), JAX more of each GPU (--gpu-memory-utilization), or the steps fewer tokens "
            "(--max-num-batched-tokens)")


def _engine_main(conn, build: dict) -> None:
    """The child process (``boot._boot``): build the engine, say ready (or why not), run the loop."""
    try:
        from jaxdyn.engine.llm import build_engine
        core = build_engine(**build)
    except BaseException as e:  # noqa: BLE001 -- reported to the server, which says it and exits
        why = out_of_device_memory(e)
        conn.send_bytes(_dumps(("failed", type(e).__name__, why or str(e))))
        return
    conn.send_bytes(_dumps(("ready", EngineFacts.of(core))))
    try:
        engine_loop(conn, core)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return                                       # the server is gone
    except BaseException as e:  # noqa: BLE001 -- the engine is dead: tell the server why
        traceback.print_exc()
        try:
            conn.send_bytes(_dumps(("dead", repr(e))))
        except OSError:
            pass


# ---- the server process ---------------------------------------------------------------------------


class ProcessEngine(StreamingEngine):
    """``AsyncEngine``'s face over an engine built and run in a child process.

    ``ProcessEngine(model, tp=, dtype=, load_format=, config=, progress=)`` takes ``build_engine``'s
    arguments and returns once the engine is loaded and warmed up (``EngineStartError`` if it cannot be)."""

    def __init__(self, model, *, tp: int = 1, dtype=None, load_format: str = "auto",
                 config: EngineConfig = EngineConfig(), progress: bool = False,
                 max_queued_requests: int | None = None, started=None, quantization: str | None = None,
                 quantize_lm_head: bool = False):
        """``started``: (process, pipe) of ``boot.start_engine_process``, already started with these arguments
        (``jaxdyn serve`` starts it before its own imports); None: started here."""
        super().__init__(max_queued_requests)
        self._closing = False
        if started is None:
            build = dict(model=model, tp=tp, dtype=dtype, load_format=load_format,
                         config=dataclasses.asdict(config), progress=progress, quantization=quantization,
                         quantize_lm_head=quantize_lm_head)
            started = start_engine_process(build)
        self._proc, self._conn = started
        try:
            msg = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._proc.join(10)
            raise EngineStartError(f"the engine process exited (code {self._proc.exitcode}) before it was "
                                   "ready") from None
        if msg[0] != "ready":
            self._proc.join(10)
            raise EngineStartError(f"{msg[1]}: {msg[2]}")
        self.core: EngineFacts = msg[1]
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="jaxdyn-engine-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="jaxdyn-engine-read", daemon=True)
        self._sender.start()
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def is_healthy(self) -> bool:
        return self.dead is None and self._proc.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine process (after the commands already sent) and wait for it."""
        if self._closing:
            return
        self._closing = True
        self._outbox.put(("shutdown",))
        self._outbox.put(None)
        self._sender.join(timeout)
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._conn.close()
        self._reader.join(5)

    def _send(self, cmd) -> None:
        self._outbox.put(cmd)

    def _prepare(self, stream, params):
        """A request that no stop string can end is decoded here, by the reader thread: the engine gets it
        with ``detokenize=False`` (its token ids, logprobs and finish are the same)."""
        if self.core.tokenizer is None or not params.detokenize or params.stop:
            return params
        stream.detok = {}
        stream.skip_special_tokens = params.skip_special_tokens
        stream.include_stop = params.include_stop_str_in_output
        return dataclasses.replace(params, detokenize=False)

    def _send_loop(self) -> None:
        """Everything queued since the last send, in one message (the event loop never blocks on the pipe)."""
        while True:
            batch = [self._outbox.get()]
            while True:
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            batch = [c for c in batch if c is not None]
            if batch:
                try:
                    self._conn.send_bytes(_dumps(("cmds", batch)))
                except OSError:
                    return                 # the engine process is gone: the reader says so
            if stop:
                return

    def _read_loop(self) -> None:
        reason = None
        while True:
            try:
                msg = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                if not self._closing:
                    self._proc.join(5)
                    reason = f"the engine process exited (code {self._proc.exitcode})"
                break
            except Exception as e:        # noqa: BLE001  (a message this side cannot read: the engine is lost to it)
                traceback.print_exc()
                reason = f"a message from the engine process could not be read ({e!r})"
                break
            if msg[0] == "dead":
                reason = f"the engine died: {msg[1]}"
                break
            try:
                _, items, snapshot = msg
                if snapshot is not None:       # before the outputs: a client that sees a finish sees its counts
                    self.core.metrics = snapshot
                pending: dict = {}
                self._handle(items, pending)
                _post(pending)
            except Exception as e:        # noqa: BLE001  (the reader dying silently left /health 200 and every
                traceback.print_exc()     # request waiting for good)
                reason = f"the engine's outputs could not be handled ({e!r})"
                break
        if reason is not None:
            log.error("%s; its requests fail and /health answers 503", reason)
            self.dead = EngineDeadError(reason)
            self.core.metrics = self.core.metrics.of_a_dead_engine()
            self._fail_all(self.dead, {})
        elif self._closing:
            # shut down with requests in flight: they end with an error and later ones are refused, as AsyncEngine's
            # (their streams waited for good, and a request added after was taken and never answered)
            self.dead = ShutdownError("the engine was shut down")
            self._fail_all(self.dead, {})

    def _handle(self, items: list, pending: dict) -> None:
        """One engine message's outputs and refusals, gathered by stream in ``pending``. An output this side
        cannot build (its text decoded here) fails its request, which is aborted; the reader goes on."""
        for item in items:
            if item[0] == "o":
                try:
                    self._output(item[1], pending)
                except Exception as e:  # noqa: BLE001 -- that request fails, not the reader (every stream)
                    self._deliver(RequestFailedError(f"the server could not build its output: {e!r}"),
                                  item[1][0], pending)
                    self._send(("abort", item[1][0]))
            else:
                _, rid, param, message = item
                self._deliver(RequestError(param, message) if param else ValueError(message), rid, pending)

    def _output(self, wire: tuple, pending: dict) -> None:
        rid, finished, cached, error, metrics, comps, plps = wire
        s = self._streams.get(rid)
        if s is None or s.closed:          # its consumer left (the abort is on its way)
            if s is not None and (finished or error is not None):
                self._streams.pop(rid, None)     # the id is free again (StreamingEngine.stream)
            return
        if plps is not None:               # sent once: in this output and again in the final one
            s.prompt_logprobs = plps
        elif finished:
            plps = s.prompt_logprobs
        acc = s.acc
        outs = []
        for index, dtext, dids, cum_lp, dlps, reason, stop_reason in comps:
            if s.detok is not None:        # decoded here (_prepare)
                d = s.detok.get(index)
                if d is None:
                    d = s.detok[index] = IncrementalDetokenizer(
                        self.core.tokenizer, s.prompt_ids, skip_special_tokens=s.skip_special_tokens)
                # no stop string reaches here: a "stop" is the EOS or a stop token, whose text stays out of the
                # output unless include_stop_str_in_output (as EngineCore._check_stop leaves it out)
                shown = dids[:-1] if reason == "stop" and dids and not s.include_stop else dids
                for t in shown:
                    d.add(t, check_stop=False)
                if reason is not None:
                    d.flush()
                dtext = d.take_delta(reason is not None)
            a = acc.get(index)
            if a is None:
                a = acc[index] = [[], [], None]
            if dtext:
                a[0] = append_piece(a[0], dtext)
            a[1].extend(dids)
            if dlps is not None:
                if a[2] is None:
                    a[2] = []
                a[2].extend(dlps)
            outs.append(CompletionOutput(index, TextPrefix(a[0], len(a[0])), TokenPrefix(a[1], len(a[1])), dtext,
                                         dids, cum_lp, a[2],
                                         dlps, reason, stop_reason))
        self._deliver(RequestOutput(rid, s.prompt_ids, outs, finished, cached, metrics, error,
                                    prompt_logprobs=plps), rid, pending)
