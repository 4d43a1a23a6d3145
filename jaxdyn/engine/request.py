"""Requests, their sequences, and what the engine hands back (plain Python, no JAX)."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import time
from collections import deque

from jaxdyn.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


class Sequence:
    """One completion of a request: its tokens, its pages and its place in the scheduler."""

    __slots__ = ("seq_id", "request", "index", "prompt_ids", "output_ids", "num_pending", "pending_rows",
                 "num_computed", "pages", "status", "admit_order", "arrival_order", "seed",
                 "fork_target", "blocked", "detok", "logprobs", "cumulative_logprob",
                 "finish_reason", "stop_reason", "emitted_tokens", "emitted_logprobs", "num_preemptions",
                 "page_array")

    def __init__(self, request: "Request", index: int, seed: int, arrival_order: int):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index
        self.prompt_ids = request.prompt_ids
        self.output_ids: list[int] = []
        self.num_pending = 0                 # tokens drawn on the device, not yet seen by the host
        self.pending_rows: deque[int] = deque()  # row in the step that drew each pending token
        self.num_computed = 0                # tokens whose K/V is written (or scheduled to be)
        self.pages: list[int] = []
        self.status = SeqStatus.WAITING
        self.admit_order = -1
        self.arrival_order = arrival_order
        self.seed = seed
        self.fork_target: int | None = None  # n > 1: this sequence prefills the shared prompt to here
        self.blocked = False                 # n > 1: waits for the shared prompt, then forks
        self.detok = None
        self.logprobs: list[dict[int, float]] | None = None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.emitted_tokens = 0
        self.emitted_logprobs = 0
        self.num_preemptions = 0
        # (pages list, its length, the same ids as i32[n]) for the runner, rebuilt when ``pages``
        # is replaced or grows; the scheduler never changes an element of the list in place.
        self.page_array = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Host-known token ids of positions [start, end) (all must be known)."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    @property
    def sort_key(self) -> tuple[int, int, int]:
        # the index last: an n > 1 request's leader (index 0) queues ahead of its siblings blocked on it,
        # so that forking them off the queue never moves the sequences after it (Scheduler.schedule)
        return (self.request.priority, self.arrival_order, self.index)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self):
        return (f"Sequence({self.request.request_id}/{self.index}, {self.status.value}, "
                f"computed={self.num_computed}/{self.num_tokens}, pages={len(self.pages)})")


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


class Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 priority: int = 0, arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.priority = priority
        self.seqs: list[Sequence] = []
        self.metrics = RequestMetrics(arrival_time if arrival_time is not None else time.monotonic())
        self.num_cached_tokens = 0
        self.max_len = 0                     # prompt + the most tokens it may generate
        self.hold_kv = False                 # keep its pages when done, until released (prefill role)
        self.final_only = False              # one output, when it finishes (offline: no per-step outputs)
        self.sampling_row = None             # runner.sampling_row(params), computed once by the engine
        self.logit_bias: tuple = ()          # params.logit_bias as sorted (token id, bias) pairs
        self.allowed: tuple = ()             # params.allowed_token_ids, sorted and distinct
        # params.prompt_logprobs: an entry per prompt token (None for the first), filled as its chunks' results come
        self.prompt_logprobs: list | None = None
        self.score_next = 0                  # the next prompt position whose next token a scheduled step scores
        self.scoring_open = False            # its prompt is still to be scored (the scheduler counts it)
        self.prompt_logprobs_sent = False    # an output has carried prompt_logprobs (they go out once, whole)

    def scoring_rows(self, start: int, end: int) -> tuple[int, int]:
        """The prompt positions ``[a, b)`` of a chunk ``[start, end)`` whose next prompt token is still to score
        (a request with ``params.prompt_logprobs``): each takes a row of the step of its own. ``(0, 0)`` when
        none."""
        a, b = max(start, self.score_next), min(end, len(self.prompt_ids) - 1)
        return (a, b) if a < b else (0, 0)

    @property
    def finished(self) -> bool:
        seqs = self.seqs
        if len(seqs) == 1:
            return seqs[0].status is SeqStatus.FINISHED
        return all(s.status is SeqStatus.FINISHED for s in seqs)


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class TokenPrefix:
    """The first ``n`` ids of a list that only ever grows at its end (a sequence's output ids):
    what ``CompletionOutput.token_ids`` was when the output was made, copied only if read."""

    __slots__ = ("ids", "n")

    def __init__(self, ids: list[int], n: int):
        self.ids, self.n = ids, n


class TextPrefix:
    """The first ``n`` pieces of a list of strings that only ever grows at its end (a sequence's streamed
    text): what ``CompletionOutput.text`` was when the output was made, joined only if read. Building each
    step's cumulative text by concatenation copied the whole output every step: quadratic in its length."""

    __slots__ = ("pieces", "n")

    def __init__(self, pieces: list[str], n: int):
        self.pieces, self.n = pieces, n


PIECES_KEPT = 64


def append_piece(pieces: list[str], piece: str) -> list[str]:
    """``pieces`` with ``piece`` at its end: the same list, or, once it holds ``PIECES_KEPT``, a new list of their
    join and the piece (a small string a token costs ~60 bytes; outputs made from the old list keep it whole)."""
    if len(pieces) >= PIECES_KEPT:
        pieces = ["".join(pieces)]
    pieces.append(piece)
    return pieces


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str                            # all text so far (the engine passes a TextPrefix)
    token_ids: list[int]                 # all tokens so far (the engine passes a TokenPrefix)
    delta_text: str                      # new since the previous output of this request
    delta_token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None   # per token: sampled token + top alternatives
    delta_logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None     # stop | length | abort
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _get_token_ids(self) -> list[int]:
    ids = self._token_ids
    if type(ids) is TokenPrefix:    # copied on first read: most outputs are read only for deltas
        ids = self._token_ids = ids.ids[:ids.n]
    return ids


def _set_token_ids(self, ids) -> None:
    self._token_ids = ids


def _get_text(self) -> str:
    text = self._text
    if type(text) is TextPrefix:    # joined on first read: most outputs are read only for deltas
        text = self._text = "".join(text.pieces[:text.n])
    return text


def _set_text(self, text) -> None:
    self._text = text


# Properties after the dataclass is made: the fields stay constructor arguments and in repr/eq.
CompletionOutput.token_ids = property(_get_token_ids, _set_token_ids)
CompletionOutput.text = property(_get_text, _set_text)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = None
    prompt: str | None = None       # the text prompt, where one was given (``LLM.generate``); vLLM's field
    # params.prompt_logprobs: per prompt token (None for the first) its logprob and the top alternatives; in the
    # first output after the prompt is computed (and in the final one), None in the others
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """``b`` (the later output of a request) with ``a``'s deltas in front of its own: one output for a
    consumer that fell behind (what vLLM's output collector does). Completions ``b`` lacks are kept."""
    earlier = {c.index: c for c in a.outputs}
    outs = []
    for c in b.outputs:
        p = earlier.pop(c.index, None)
        if p is None:
            outs.append(c)
            continue
        lps = None
        if p.delta_logprobs is not None or c.delta_logprobs is not None:
            lps = list(p.delta_logprobs or []) + list(c.delta_logprobs or [])
        outs.append(CompletionOutput(c.index, c._text, c._token_ids, p.delta_text + c.delta_text,
                                     list(p.delta_token_ids) + list(c.delta_token_ids), c.cumulative_logprob,
                                     c.logprobs, lps, c.finish_reason, c.stop_reason))
    outs.extend(earlier.values())
    outs.sort(key=lambda c: c.index)
    return RequestOutput(b.request_id, b.prompt_token_ids, outs, b.finished, b.num_cached_tokens, b.metrics,
                         b.error, b.prompt, b.prompt_logprobs if b.prompt_logprobs is not None else a.prompt_logprobs)
