"""DisaggEngine: prefill on one mesh, decode on another, KV handed over device to device.

Two ``EngineCore``s hold the same model on disjoint devices, each with its own
tensor-parallel degree, paged cache, prefix cache and scheduler:

* the **prefill role** runs on its own thread. A remote request enters it with
  ``max_tokens=1`` and ``hold_kv``: it is prefilled (chunked, prefix-cached as
  any request), its first token is drawn there with the request's own seed,
  and when it finishes its pages are held. The thread then gathers those pages
  into a KV block (``jaxdyn.kv.transfer``), puts it on the decode mesh with
  ``jax.device_put`` (a device-to-device copy, resharded when the TP degrees
  differ), releases the pages (into its prefix cache) and hands the block and
  the first token over. Nothing waits for the transfer: it is ordered on the
  devices, not on the host.
* the **decode role** is driven by ``step()`` (the engine thread of
  ``AsyncEngine``, or ``LLM``). When the policy sends a request remote, pages
  for its prompt are reserved on the decode side at once. A handoff is
  scattered into them and the request joins the decode batch through
  ``EngineCore.add_prefilled``: its first token is emitted at that moment
  (streamed to the client) and goes through the same stop checks as any other.
  Other requests (short prompts, prefix hits, ...) are prefilled locally.

Faults: a remote prefill that fails, is aborted or outlives
``policy.prefill_timeout_s`` frees the pages reserved for it and ends with an
error output (``RequestOutput.error``); a late handoff of such a request is
dropped. If the prefill thread dies, its requests end with errors and every
later request is prefilled locally.

The interface is ``EngineCore``'s (``add_request``, ``abort``, ``step``,
``has_unfinished``, ``check_request``, ``metrics``, ...), so ``AsyncEngine``,
``LLM`` and the server run on it unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import time
import traceback

from jaxdyn.disagg.policy import REMOTE, DisaggPolicy
from jaxdyn.engine.async_engine import CommandThread
from jaxdyn.engine.core import EngineCore, RequestError
from jaxdyn.engine.request import CompletionOutput, RequestMetrics, RequestOutput
from jaxdyn.engine.sampling_params import SamplingParams
from jaxdyn.kv.transfer import KVGather, KVScatter, to_mesh


@dataclasses.dataclass
class _Remote:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams          # the client's, with its seed fixed
    priority: int
    arrival_time: float
    started: float
    pages: list[int]                # reserved on the decode side


@dataclasses.dataclass
class Handoff:
    """What the prefill role gives the decode role for one request."""
    request_id: str
    block: object                   # KV block (jax.Array on the decode mesh, or host numpy)
    first_token: int
    first_logprobs: dict | None
    num_cached_tokens: int
    prefill_done: float             # time.monotonic() when the prefill's output was read


class DisaggEngine:
    def __init__(self, prefill, decode: EngineCore, policy: DisaggPolicy = DisaggPolicy()):
        """``prefill``: an ``EngineCore`` on other devices of this process (run by a
        ``LocalPrefillRole`` on its own thread), or any prefill role object (``submit``, ``abort``,
        ``dead``, ``warmup``, ``shutdown``, delivering to the sink it is given) such as the gRPC
        client of a prefill worker in ``serving/workers``."""
        self._handoffs: queue.SimpleQueue = queue.SimpleQueue()
        self.decode, self.policy = decode, policy
        dc = decode.model_config
        if isinstance(prefill, EngineCore):
            pc = prefill.model_config
            if (pc.vocab_size, pc.num_layers, pc.num_kv_heads, pc.head_dim) != \
                    (dc.vocab_size, dc.num_layers, dc.num_kv_heads, dc.head_dim):
                raise ValueError("the prefill and decode engines must hold the same model")
            if prefill.config.page_size != decode.config.page_size:
                raise ValueError(f"page sizes differ: prefill {prefill.config.page_size}, "
                                 f"decode {decode.config.page_size}")
            if set(prefill.runner.mesh.devices.flat) & set(decode.runner.mesh.devices.flat):
                raise ValueError("the prefill and decode meshes must use disjoint devices")
            self.max_model_len = min(prefill.max_model_len, decode.max_model_len)
            prefill = LocalPrefillRole(prefill, self._handoffs.put, self.max_model_len,
                                       target_mesh=decode.runner.mesh)
        else:
            self.max_model_len = decode.max_model_len
            prefill.set_sink(self._handoffs.put)
        self.role = prefill
        max_pages = math.ceil(self.max_model_len / decode.config.page_size)
        self.scatter = KVScatter(decode.runner, dc.num_kv_heads, max_pages)
        self.load_info: dict[str, float] = {}
        self._remote: dict[str, _Remote] = {}            # engine thread's view of remote prefills

    @property
    def prefill(self) -> EngineCore | None:
        """The prefill engine when it runs in this process."""
        return getattr(self.role, "core", None)

    @property
    def prefill_dead(self) -> BaseException | None:
        return self.role.dead

    def prefill_gauges(self) -> dict | None:
        """The in-process prefill engine's queues and pages, read now (``EngineCore.gauges``: its metrics change
        only when it steps, and it releases a finished prompt's pages after its last step); None where the prefill
        role is elsewhere."""
        core = self.prefill
        return None if core is None else core.gauges()

    # ---- EngineCore's face -----------------------------------------------------------------------

    @property
    def config(self):
        return self.decode.config

    @property
    def model_config(self):
        return self.decode.model_config

    @property
    def tokenizer(self):
        return self.decode.tokenizer

    @property
    def eos_token_ids(self):
        return self.decode.eos_token_ids

    @property
    def metrics(self):
        return self.decode.metrics

    @property
    def num_pages(self) -> int:
        return self.decode.num_pages

    @property
    def requests(self):
        return self.decode.requests

    def warmup(self, progress: bool = False) -> float:
        t0 = time.perf_counter()
        self.role.warmup(progress)
        self.decode.warmup(progress)
        self.scatter.warmup()
        prefill = self.prefill
        if prefill is not None and prefill.runner.kv_spec.dtype != self.decode.runner.kv_spec.dtype:
            self.scatter.warmup(prefill.runner.kv_spec.dtype)    # its blocks are converted in the scatter
        return time.perf_counter() - t0

    def check_request(self, prompt_ids, params: SamplingParams) -> None:
        self.decode.check_request(prompt_ids, params)
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError("prompt", f"the prompt has {len(prompt_ids)} tokens; this model's context "
                               f"is {self.max_model_len} tokens and at least one must be left to generate")

    def add_request(self, request_id: str, prompt_ids, params: SamplingParams, *,
                    priority: int = 0, arrival_time: float | None = None) -> None:
        prompt_ids = list(prompt_ids)
        if request_id in self._remote or request_id in self.decode.requests:
            raise RequestError("request_id", f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        cache = self.decode.prefix_cache
        decision = self.policy.decide(
            prompt_len=len(prompt_ids), decode_cached=cache.peek(prompt_ids, params.cache_salt) if cache else 0,
            prefill_queue=len(self._remote), n=params.n, prefill_alive=self.prefill_dead is None,
            prompt_logprobs=params.prompt_logprobs is not None)
        pages = None
        if decision == REMOTE:
            # everything that can be refused before the pages are reserved
            seed = params.seed if params.seed is not None else self.decode.draw_seed()
            params = dataclasses.replace(params, seed=seed)
            first = prefill_params(params)
            pages = self.decode.reserve_kv(request_id, len(prompt_ids))
            if pages is None:
                decision = "decode_full"
        m = self.metrics
        if decision != REMOTE:
            m.prefill_decisions[decision] = m.prefill_decisions.get(decision, 0) + 1
            self.decode.add_request(request_id, prompt_ids, params, priority=priority, arrival_time=arrival)
            return
        self._remote[request_id] = _Remote(request_id, prompt_ids, params, priority, arrival,
                                           time.monotonic(), pages)
        try:
            self.role.submit(request_id, prompt_ids, first, priority, arrival)
        except BaseException:
            del self._remote[request_id]
            self.decode.unreserve_kv(request_id)
            raise
        # the gauge now: a step that waits for the prefill role's handoff sets it only once one comes
        m.num_remote_prefills = len(self._remote)

    def abort(self, request_id: str) -> RequestOutput | None:
        r = self._remote.pop(request_id, None)
        if r is None:
            return self.decode.abort(request_id)
        self._count_remote()
        self.decode.unreserve_kv(request_id)
        self.role.abort(request_id)
        self.metrics.num_remote_prefills = len(self._remote)
        self._count_finish("abort", r.params.n)
        return _final_output(r, "abort", None)

    def has_unfinished(self) -> bool:
        return bool(self._remote) or self.decode.has_unfinished()

    def step(self) -> list[RequestOutput]:
        outputs = self._expire()
        outputs += self._take_handoffs(block=not self.decode.has_unfinished() and bool(self._remote))
        if self.decode.has_unfinished():
            outputs += self.decode.step()
        m = self.metrics
        m.compilations_after_warmup = (self.decode.runner.compiles_while_serving
                                       + self.role.compiles_while_serving)
        m.remote_prefill_tokens = self.role.computed_prefill_tokens
        m.num_remote_prefills = len(self._remote)
        return outputs

    def shutdown(self) -> None:
        self.role.shutdown()

    # ---- decode side (engine thread) -------------------------------------------------------------

    def _take_handoffs(self, block: bool) -> list[RequestOutput]:
        outputs = []
        while True:
            try:
                item = self._handoffs.get(timeout=0.05) if block else self._handoffs.get_nowait()
            except queue.Empty:
                return outputs
            block = False
            if isinstance(item, Handoff):
                out = self.accept_handoff(item)
                if out is not None:
                    outputs.append(out)
                continue
            kind, rid, message = item        # ("error" | "local", request_id, message)
            if kind == "local":              # nothing was computed remotely (no worker reachable): here, then
                out = self._prefill_here(rid, message)
                if out is not None:
                    outputs.append(out)
                continue
            # "*": the prefill role died, and every remote request fails with it
            failed = list(self._remote) if rid == "*" else [rid] if rid in self._remote else []
            outputs += [self._fail(self._remote[f], message) for f in failed]

    def _prefill_here(self, request_id: str, why: str) -> RequestOutput | None:
        """A remote request no prefill worker took: its reserved pages freed, its prompt computed by the decode
        engine like any local one (its seed kept, so it draws what the remote prefill would have); the request's
        failed output if the decode engine refuses it now."""
        r = self._remote.get(request_id)
        if r is None:                        # aborted or timed out meanwhile
            return None
        try:
            self.decode.check_request(r.prompt_ids, r.params)
        except (RequestError, ValueError) as e:
            return self._fail(r, f"{why}, and this engine cannot take it: {e}")
        del self._remote[request_id]
        self.decode.unreserve_kv(request_id)
        d = self.metrics.prefill_decisions     # where the prompt was computed: here after all
        d["prefill_unreachable"] = d.get("prefill_unreachable", 0) + 1
        self.decode.add_request(request_id, r.prompt_ids, r.params, priority=r.priority, arrival_time=r.arrival_time)
        return None

    def accept_handoff(self, h: Handoff) -> RequestOutput | None:
        """Scatter a handoff's KV into the pages reserved for it and continue decoding it."""
        r = self._remote.get(h.request_id)
        if r is None:                    # aborted or timed out meanwhile: its pages are gone
            return None
        try:
            self.scatter(r.pages, h.block, r.prompt_ids)     # checks the block first (KVScatter.refusal)
        except ValueError as e:          # e.g. a prefill worker of another page size: this request fails
            return self._fail(r, f"the KV handoff does not fit this engine: {e}", abort_prefill=True)
        del self._remote[h.request_id]
        self._count_remote()
        m = self.metrics
        m.kv_transfers += 1
        m.kv_transfer_bytes += int(h.block.nbytes) * len(r.pages) // h.block.shape[3]
        m.kv_handoff.observe(time.monotonic() - h.prefill_done)
        try:
            return self.decode.add_prefilled(
                r.request_id, r.prompt_ids, r.params, seed=r.params.seed, first_token=h.first_token,
                first_logprobs=h.first_logprobs, priority=r.priority, arrival_time=r.arrival_time,
                num_cached_tokens=h.num_cached_tokens)
        except RequestError as e:       # this request fails (add_prefilled freed its pages), not the engine's step
            self._count_finish("error", r.params.n)
            self.metrics.remote_prefill_failures += 1
            return _final_output(r, "abort", f"the prefilled request could not continue here: {e}")

    def _count_remote(self) -> None:
        """A remote prefill's decision, counted once it is over (handed off, failed or aborted), not when it is
        made: one that no prefill worker answers is computed here and counted as ``prefill_unreachable`` instead
        (a counter taken back would read as a reset to Prometheus)."""
        d = self.metrics.prefill_decisions
        d[REMOTE] = d.get(REMOTE, 0) + 1

    def _expire(self) -> list[RequestOutput]:
        now = time.monotonic()
        late = [r for r in self._remote.values() if now - r.started > self.policy.prefill_timeout_s]
        message = f"remote prefill did not finish within {self.policy.prefill_timeout_s:g} s"
        return [self._fail(r, message, abort_prefill=True) for r in late]

    def _fail(self, r: _Remote, message: str, abort_prefill: bool = False) -> RequestOutput:
        """End a remote request with an error: its reserved pages freed (and its prefill stopped)."""
        del self._remote[r.request_id]
        self._count_remote()
        self.decode.unreserve_kv(r.request_id)
        if abort_prefill:
            self.role.abort(r.request_id)
        self._count_finish("error", r.params.n)
        self.metrics.remote_prefill_failures += 1
        return _final_output(r, "abort", message)

    def _count_finish(self, reason: str, n: int) -> None:
        """``requests_finished`` by sequence, as ``EngineCore`` counts: ``n`` of ``reason``."""
        f = self.metrics.requests_finished
        f[reason] = f.get(reason, 0) + n



def prefill_params(params: SamplingParams) -> SamplingParams:
    """What the prefill role runs: the prompt and one token, drawn with the request's own seed
    (stop strings and detokenization stay with the decode role, which checks the token); a ``min_tokens`` of
    one or more bans the end tokens from that first token, as the whole request's does."""
    return dataclasses.replace(params, n=1, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=[],
                               detokenize=False, include_stop_str_in_output=False, prompt_logprobs=None)


class LocalPrefillRole(CommandThread):
    """Runs a prefill ``EngineCore`` on its own thread and hands each finished prompt over.

    ``sink`` receives a ``Handoff`` per finished prefill (its KV block on ``target_mesh``, or on
    the prefill mesh when that is None, e.g. to be sent to another process), or
    ``("error", request_id, message)``; ``request_id == "*"`` when the role itself died.
    """

    def __init__(self, core: EngineCore, sink, max_model_len: int | None = None, target_mesh=None):
        self.core = core
        self.sink = sink
        self.target_mesh = target_mesh
        max_len = max_model_len or core.max_model_len
        self.gather = KVGather(core.runner, core.model_config.num_kv_heads,
                               math.ceil(max_len / core.config.page_size))
        self.dead: BaseException | None = None
        self._start("jaxdyn-prefill")

    @property
    def computed_prefill_tokens(self) -> int:
        return self.core.metrics.computed_prefill_tokens

    @property
    def compiles_while_serving(self) -> int:
        return self.core.runner.compiles_while_serving

    def set_sink(self, sink) -> None:
        self.sink = sink

    def warmup(self, progress: bool = False) -> None:
        self.core.warmup(progress)
        self.gather.warmup()

    def submit(self, request_id, prompt_ids, params, priority=0, arrival_time=None) -> None:
        self._send(("add", request_id, list(prompt_ids), params, priority, arrival_time))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _loop(self) -> None:
        core = self.core
        try:
            while not self._stop:
                for cmd in self._taken():
                    if cmd[0] == "add":
                        _, rid, prompt, params, priority, arrival = cmd
                        try:
                            core.add_request(rid, prompt, params, priority=priority, arrival_time=arrival,
                                             hold_kv=True)
                        except ValueError as e:
                            self.sink(("error", rid, f"remote prefill refused: {e}"))
                    else:
                        core.abort(cmd[1])
                        core.release_kv(cmd[1])
                if core.has_unfinished():
                    for out in core.step():
                        if out.finished:
                            self._hand_over(out)
                else:
                    self._wake.wait(0.05)
        except BaseException as e:    # the prefill role is dead; the decode role goes on alone
            self.dead = e
            traceback.print_exc()
            self.sink(("error", "*", f"the prefill engine died: {e!r}"))

    def _hand_over(self, out: RequestOutput) -> None:
        c = out.outputs[0]
        rid = out.request_id
        pages = self.core.held_pages(rid)
        if c.finish_reason == "abort" or pages is None or not c.token_ids:
            self.core.release_kv(rid)
            return
        n = math.ceil(len(out.prompt_token_ids) / self.core.config.page_size)
        block = self.gather(pages[:n])
        if self.target_mesh is not None:
            block = to_mesh(block, self.target_mesh, self.gather.num_kv_heads)
        self.core.release_kv(rid)        # after the gather is queued: the device reads first
        lps = c.logprobs[0] if c.logprobs else None
        self.sink(Handoff(rid, block, c.token_ids[0], lps, out.num_cached_tokens, time.monotonic()))


def _final_output(r: _Remote, reason: str, error: str | None) -> RequestOutput:
    c = CompletionOutput(0, "", [], "", [], None, None, None, reason)
    metrics = RequestMetrics(r.arrival_time, finished_time=time.monotonic())
    return RequestOutput(r.request_id, r.prompt_ids, [c], True, 0, metrics, error=error)
