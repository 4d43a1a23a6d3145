"""The OpenAI-compatible HTTP server (Starlette): completions, chat, models, health, metrics, tokenize.

Requests are validated before anything reaches the engine; every refusal is
an OpenAI error body ``{"error": {"message", "type", "param", "code"}}`` with
a 4xx status. Streams are Server-Sent Events exactly as OpenAI frames them
(``data: {json}\\n\\n`` ... ``data: [DONE]\\n\\n``). A client that goes away
aborts its requests at once (the engine frees their pages).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import jaxdyn
from jaxdyn import AsyncEngine, EngineDeadError, RequestError, SamplingParams
from jaxdyn.engine.async_engine import RequestFailedError, ShutdownError
from jaxdyn.engine.request import CompletionOutput, RequestOutput
from jaxdyn.engine.sampling_params import MAX_LOGPROBS, SamplingParamsError
from jaxdyn.engine.chat import ChatTemplateError, chat_prompt, message_text
from serving.metrics import make_registry, render
from serving.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest)
from serving.tool_parsers import ToolCallStream, make_parser

log = logging.getLogger("jaxdyn.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ServerState:
    """What the app serves: set ``engine`` once loaded (``/health`` is 503 until then)."""

    def __init__(self, model_name: str, *, max_queued_requests: int | None = None,
                 max_request_bytes: int = 8 << 20, sampling_defaults: dict | None = None,
                 tool_call_parser: str | None = None, aliases: tuple[str, ...] = (), model_root: str | None = None):
        self.model_name = model_name
        # what /v1/models gives as each name's ``root``: the model as ``jaxdyn serve`` was given it (vLLM's model path)
        self.model_root = model_root or model_name
        # every name a request may give as ``model`` (vLLM's several --served-model-name), the first the one
        # responses carry when a request gives none; /v1/models lists them all
        self.model_names = tuple(dict.fromkeys((model_name, *aliases)))
        # vLLM's --enable-auto-tool-choice with --tool-call-parser: chat replies to requests with tools (tool_choice
        # "auto") are read for tool calls in this syntax (serving.tool_parsers); None: such requests are refused
        self.tool_parser = make_parser(tool_call_parser) if tool_call_parser is not None else None
        # a request's defaults where it leaves a field out: the model's generation_config.json (vLLM's
        # --generation-config auto), {SamplingParams field: value}
        self.sampling_defaults = dict(sampling_defaults or {})
        self.max_queued_requests = max_queued_requests
        self.max_request_bytes = max_request_bytes
        self.engine: AsyncEngine | None = None
        self.load_error: BaseException | None = None
        self._lock = threading.Lock()
        self.in_flight = 0

    @property
    def core(self):
        return self.engine.core if self.engine is not None else None

    def ready(self) -> bool:
        return self.engine is not None and self.engine.is_healthy


# ---- helpers --------------------------------------------------------------------------------------


async def _read_json(request: Request, limit: int) -> dict:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise APIError(413, f"request body of {cl} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    body = bytes(body)
    encoding = json.detect_encoding(body)     # UTF-8 (a BOM allowed), UTF-16 or UTF-32, as json.loads of bytes reads
    try:
        # strictly: json.loads of the bytes would decode a surrogate encoded in them (its surrogatepass), a string
        # the tokenizer cannot take
        text = body.decode(encoding)
    except UnicodeDecodeError as e:
        raise APIError(400, f"malformed JSON body: not {encoding.upper().removesuffix('-SIG')} text ({str(e)[:160]})",
                       code="invalid_json") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        # not JSON, an integer literal of more than 4,300 digits, or nested too deep to parse
        raise APIError(400, f"malformed JSON body: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the JSON body must be an object", code="invalid_json")
    _check_body(data, strings=_SURROGATE_ESCAPE.search(text) is not None)
    return data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
MAX_JSON_DEPTH = 64     # objects and arrays within each other (deeper: a template's tojson recursed past the stack)


def _check_body(data, strings: bool) -> None:
    """One walk over a parsed body: refuse one whose objects and arrays nest more than ``MAX_JSON_DEPTH`` deep (a
    tool's schema rendered by a chat template's ``tojson``, or a validator, would otherwise recurse past Python's
    stack: a 500), and with ``strings`` (the body has a surrogate escape) one whose strings hold an unpaired UTF-16
    surrogate (JSON's ``\\ud800`` escape): not Unicode text, which the tokenizer cannot take. Pairs (an emoji escaped
    by an ASCII-only encoder) are text."""
    todo = [(data, 1)]
    while todo:
        x, depth = todo.pop()
        if isinstance(x, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise APIError(400, f"malformed JSON body: nested more than {MAX_JSON_DEPTH} deep",
                               code="invalid_json")
            items = x if isinstance(x, list) else [*x.keys(), *x.values()] if strings else x.values()
            todo.extend((v, depth + 1) for v in items if strings or isinstance(v, (dict, list)))
        elif strings and isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "malformed JSON body: a string holds an unpaired UTF-16 surrogate "
                               "(a \\ud800-\\udfff escape without its pair), which is not Unicode text",
                               code="invalid_json") from None


# what a field of several accepted types must be, for a value of none of them
_ACCEPTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "content": "must be a string, a list of content parts or null",
}
_NUMBERS = {"temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"}


def _validate(model_cls, data: dict):
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        err = errs[0]
        # drop the names pydantic gives a union's members ("str", "list[int]", "function-after[...]")
        path = [str(x) for x in err["loc"] if isinstance(x, int)
                or not (x in ("str", "int", "float", "bool") or x.startswith(("function-", "list[", "dict[")))] \
            or [str(err["loc"][0])]
        param = ".".join(path)
        field = path[-1] if path[-1] in _ACCEPTS else path[0]
        same = [x for x in errs if x["loc"][:1] == err["loc"][:1]]
        types_only = all(x["type"].endswith("_type") for x in same)
        got = repr(err["input"])[:60] if not isinstance(err["input"], dict) else "an object"
        if field in _NUMBERS and types_only:
            msg = f"must be a number, got {got}"
        elif field in _ACCEPTS and len(same) > 1 and types_only:
            msg = f"{_ACCEPTS[field]}, got {got}"
        else:
            msg = err["msg"]
        raise APIError(400, f"{param}: {msg}", param=path[0], code="invalid_value") from None


# OpenAI / vLLM request fields this server does not implement, with what a request may send and still be
# served: a request asking for more is refused by name rather than served as if the field were absent.
UNSUPPORTED = {
    "best_of": "sampling several and returning the best",
    "response_format": "structured output (response_format other than {\"type\": \"text\"})",
    "guided_json": "guided decoding",
    "guided_regex": "guided decoding",
    "guided_choice": "guided decoding",
    "guided_grammar": "guided decoding",
    "structured_outputs": "structured output",
    "logits_processors": "logits processors",
    "use_beam_search": "beam search",
    "bad_words": "bad_words",
    "spaces_between_special_tokens": "spaces_between_special_tokens other than true",
    "tools": "tool calling (tools with a tool_choice other than \"none\"; \"auto\" with serve's "
             "--enable-auto-tool-choice and --tool-call-parser)",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "chat_template": "a chat template given by the request (the model's own is rendered)",
}


def _tool_parsing(req, parser) -> bool:
    """Whether a chat request's reply is read for tool calls: tools given, ``tool_choice`` "auto" (or left out,
    OpenAI's default with tools) and a parser configured (vLLM's ``--enable-auto-tool-choice``). A tool_choice
    that forces a call ("required", or a named function) is refused: it takes guided decoding, which this server
    does not implement."""
    choice = getattr(req, "tool_choice", None)
    tools = getattr(req, "tools", None)
    if choice is not None and choice != "none" and not tools:
        raise APIError(400, "tool_choice: needs tools", param="tool_choice")
    if not tools or choice == "none" or parser is None:
        return False
    if choice not in (None, "auto"):
        raise APIError(400, f"tool_choice: only \"auto\" and \"none\" are served (a forced call, "
                       f"{json.dumps(choice)[:80]}, needs guided decoding, which this server does not implement)",
                       param="tool_choice", code="unsupported")
    return True


def _add_requests(engine, prompts: list, params, rid: str, priority: int) -> list:
    """The streams of a completion request's prompts (ids ``{rid}-{i}``), each added to the engine; where adding
    one fails, those added before it are aborted first (their streams would never run: a front end over workers
    kept their entries, counted as in flight, for good)."""
    added = []
    try:
        for i, ids in enumerate(prompts):
            added.append(engine.add_request(ids, params, f"{rid}-{i}", priority=priority))
    except BaseException:
        for s in added:
            engine.abort(s.request_id)
        raise
    return [engine.stream(s) for s in added]


def _allowed_calls(calls: list, req) -> list:
    """The tool calls a reply returns: with ``parallel_tool_calls`` false, its first only (OpenAI's at most one; vLLM
    keeps the first as well)."""
    return calls[:1] if req.parallel_tool_calls is False else calls


def _refuse_unsupported(req, tool_parsing: bool = False) -> None:
    for name, what in UNSUPPORTED.items():
        value = getattr(req, name, None)
        if name == "spaces_between_special_tokens":
            if value is None or value is True:          # vLLM's default: what this server does
                continue
        elif value is None or value is False or value == {} or value == []:
            continue
        if name == "best_of" and value == (req.n if req.n is not None else 1):
            continue                                    # best_of = n: every sample is returned
        if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
            continue
        if name in ("tools", "tool_choice") and (getattr(req, "tool_choice", None) == "none" or tool_parsing):
            continue                                    # tools described but none may be called, or parsed
        raise APIError(400, f"{name}: {what} is not supported by this server", param=name,
                       code="unsupported")


MAX_N = 128     # completions per prompt (OpenAI's cap): more, and one request occupies the engine for minutes


def _check_request_fields(req) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
    if req.n is not None and req.n > MAX_N:
        raise APIError(400, f"n: at most {MAX_N} completions a prompt, got {req.n}", param="n",
                       code="invalid_value")


def _logit_bias(bias: dict | None) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token ids as strings) as SamplingParams takes it, each bias clamped to [-100, 100]
    as vLLM's server does."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias: {key[:50]!r} is not a token id", param="logit_bias",
                           code="invalid_value") from None
        out[token] = float(min(100.0, max(-100.0, value)))    # vLLM's clamp (an int of any size, inf, NaN)
    return out


def _sampling_params(req, *, max_tokens, logprobs, defaults: dict | None = None,
                     prompt_logprobs: int | None = None) -> SamplingParams:
    """``defaults``: the model's generation config's, for the fields the request leaves out; its max_new_tokens
    caps max_tokens, as vLLM's (the smallest of the request's, the config's and the context's)."""
    d = defaults or {}
    if req.prompt_logprobs is not None and req.stream:
        raise APIError(400, "prompt_logprobs: not available when stream is true", param="prompt_logprobs",
                       code="invalid_value")

    def pick(value, field, builtin):
        return value if value is not None else d.get(field, builtin)

    cap = d.get("max_tokens")
    if cap is not None:
        max_tokens = cap if max_tokens is None else min(max_tokens, cap)
    try:
        return SamplingParams(
            n=req.n if req.n is not None else 1,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens or 0,
            temperature=pick(req.temperature, "temperature", 1.0),
            top_p=pick(req.top_p, "top_p", 1.0),
            top_k=pick(req.top_k, "top_k", 0),
            min_p=pick(req.min_p, "min_p", 0.0),
            repetition_penalty=pick(req.repetition_penalty, "repetition_penalty", 1.0),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed,
            stop=[req.stop] if isinstance(req.stop, str) else (req.stop or []),
            stop_token_ids=req.stop_token_ids or [],
            ignore_eos=bool(req.ignore_eos),
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens is not False,
            logit_bias=_logit_bias(req.logit_bias),
            allowed_token_ids=req.allowed_token_ids,
            prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else req.prompt_logprobs,
            cache_salt=req.cache_salt,
        )
    except SamplingParamsError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None


def _check_model(state: ServerState, model: str | None) -> str:
    """The name a response carries (the request's, as vLLM's, or the first served name when it gives none);
    404 for a name the server does not serve."""
    if model is None:
        return state.model_name
    if model not in state.model_names:
        served = " or ".join(repr(n) for n in state.model_names)
        raise APIError(404, f"model: the model {model!r} does not exist; this server serves {served}",
                       param="model", code="model_not_found", type_="not_found_error")
    return model


def _require_engine(state: ServerState) -> AsyncEngine:
    if state.engine is None:
        raise APIError(503, "the model is still loading", code="service_unavailable",
                       type_="service_unavailable", headers={"Retry-After": "5"})
    if not state.engine.is_healthy:
        raise APIError(503, "the engine is not running", code="service_unavailable", type_="service_unavailable")
    return state.engine


def _admit(state: ServerState, engine: AsyncEngine, seqs: int) -> None:
    """Admit a request of ``seqs`` sequences (its prompts times n) under ``--max-queued-requests``: the
    sequences in flight may exceed ``max_num_seqs`` by at most that bound. A request larger than the whole
    bound could never be admitted: a 400, not a 503 its client would retry forever."""
    if state.max_queued_requests is None:
        return
    cap = engine.core.config.max_num_seqs + state.max_queued_requests
    if seqs > cap:
        raise APIError(400, f"the request asks for {seqs} sequences (prompts x n); this server admits at most "
                       f"{cap} at once (max_num_seqs {engine.core.config.max_num_seqs} + queue bound "
                       f"{state.max_queued_requests})", param="n", code="too_many_sequences")
    if engine.num_unfinished_seqs + seqs > cap:
        raise APIError(503, f"the server is at capacity ({engine.num_unfinished_seqs} sequences in flight, "
                       f"queue bound {state.max_queued_requests})", code="queue_full",
                       type_="service_unavailable", headers={"Retry-After": "1"})


def _check(engine: AsyncEngine, prompt_ids, params, param_prefix=None) -> None:
    try:
        engine.core.check_request(prompt_ids, params)
    except RequestError as e:
        param = e.param if param_prefix is None or e.param != "prompt" else param_prefix
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None


def _check_room(engine: AsyncEngine, prompt_ids, max_tokens: int | None, param: str) -> None:
    """An explicit max_tokens that the context cannot hold after the prompt is a 400, as vLLM's server answers
    (the engine itself would stop the request at the context's end, finish_reason "length")."""
    room = engine.core.max_model_len - len(prompt_ids)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"{param}: {max_tokens} is too large: this model's context is "
                       f"{engine.core.max_model_len} tokens and the prompt has {len(prompt_ids)} "
                       f"({max_tokens} > {engine.core.max_model_len} - {len(prompt_ids)})", param=param,
                       code="invalid_value")


def _usage_options(req) -> tuple[bool, bool]:
    """``stream_options``' (include_usage, continuous_usage_stats): usage in a last chunk, and in every chunk (one
    choice's: its prompt and its tokens so far, as vLLM's). Continuous usage needs include_usage, as in vLLM."""
    o = req.stream_options
    include = bool(o and o.include_usage)
    return include, include and bool(o.continuous_usage_stats)


def _usage_so_far(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _usage(prompt_lens: list[int], outputs: list[RequestOutput], cached: int, generated: bool = True) -> dict:
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs) if generated else 0
    prompt = sum(prompt_lens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


_ENCODE_POOL: concurrent.futures.ThreadPoolExecutor | None = None
ENCODE_INLINE_CHARS = 2048     # shorter texts are encoded on the event loop (a thread hop costs more)


async def _encode(tok, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text``. A long text is encoded on a thread pool: the tokenizer releases the GIL, so
    the event loop keeps streaming meanwhile and a burst of long prompts encodes on several cores (a
    1,500-word prompt takes ~4.5 ms here; a thousand of them at once held the loop for seconds)."""
    if len(text) < ENCODE_INLINE_CHARS:
        return tok.encode(text, add_special_tokens=add_special_tokens)
    global _ENCODE_POOL
    if _ENCODE_POOL is None:
        _ENCODE_POOL = concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 2), "jaxdyn-tokenize")
    return await asyncio.get_running_loop().run_in_executor(
        _ENCODE_POOL, functools.partial(tok.encode, text, add_special_tokens=add_special_tokens))


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _merge(gens: list) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine streams; cancelling the consumer aborts all of them."""
    if len(gens) == 1:
        async with contextlib.aclosing(gens[0]) as outs:     # closed with this one: leaving aborts it now
            async for out in outs:
                yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, g):
        try:
            async for out in g:
                await q.put((i, out))
            await q.put((i, None))
        except BaseException as e:  # noqa: BLE001 -- forwarded to the consumer
            await q.put((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnect(request: Request, coro):
    """Run ``coro``; cancel it (aborting its requests) if the client goes away first."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "client disconnected")


# ---- logprobs formats --------------------------------------------------------------------------------


def _tok_str(tokenizer, tid: int) -> str:
    return tokenizer.token_text(tid) if tokenizer is not None else str(tid)


def _tok_bytes(tokenizer, tid: int, as_ids: bool) -> list[int]:
    """A chat logprob entry's ``bytes``: what the token stands for in the text (``Tokenizer.token_bytes``: a token
    of part of a character its own bytes, not U+FFFD's), or the bytes of what ``as_ids`` shows."""
    if as_ids or tokenizer is None:
        return list(_shown(tokenizer, tid, as_ids).encode())
    return list(tokenizer.token_bytes(tid))


def _shown(tokenizer, tid: int, as_ids: bool) -> str:
    """A logprob entry's token: its text, or ``token_id:<id>`` (vLLM's ``return_tokens_as_token_ids``, for tokens
    whose text is not valid UTF-8 alone)."""
    return f"token_id:{tid}" if as_ids else _tok_str(tokenizer, tid)


def _completion_logprobs(tokenizer, token_ids, lps, text_offset0: int, as_ids: bool = False) -> tuple[dict, int]:
    """(the choice's logprobs, the text offset after its last token: where a stream's next chunk counts from);
    ``text_offset`` counts characters of the text (the token's text), whatever ``as_ids`` shows. An entry of
    None (an echoed prompt's first token, which nothing precedes) has a null logprob and null top logprobs."""
    tokens, token_lps, tops, offsets = [], [], [], []
    off = text_offset0
    for tid, entry in zip(token_ids, lps):
        tokens.append(_shown(tokenizer, tid, as_ids))
        if entry is None:
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(entry[tid].logprob)
            tops.append({_shown(tokenizer, t, as_ids): lp.logprob for t, lp in entry.items()
                         if lp.rank is not None or t == tid})
        offsets.append(off)
        off += len(_tok_str(tokenizer, tid))
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, off


def _prompt_logprobs_json(tokenizer, plps) -> list | None:
    """vLLM's ``prompt_logprobs`` response field: per prompt token None (the first) or {token id (a string):
    {logprob, rank, decoded_token}}."""
    if plps is None:
        return None
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                             "decoded_token": _tok_str(tokenizer, t)} for t, lp in e.items()}
            for e in plps]


def _chat_logprobs(tokenizer, token_ids, lps, top_n: int, as_ids: bool = False) -> dict:
    content = []
    for tid, entry in zip(token_ids, lps):
        s = _shown(tokenizer, tid, as_ids)
        tops = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None), key=lambda x: x[1].rank)[:top_n]
        content.append({"token": s, "logprob": entry[tid].logprob, "bytes": _tok_bytes(tokenizer, tid, as_ids),
                        "top_logprobs": [{"token": _shown(tokenizer, t, as_ids), "logprob": lp.logprob,
                                          "bytes": _tok_bytes(tokenizer, t, as_ids)} for t, lp in tops]})
    return {"content": content}


def _truncate_prompt(engine: AsyncEngine, ids: list[int], req) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: k keeps the prompt's last k tokens (the first k with ``truncation_side``
    "right"); -1 the model's context length."""
    k = req.truncate_prompt_tokens
    if k is None:
        return ids
    limit = engine.core.max_model_len
    if k == -1:
        k = limit
    if k < 1:
        raise APIError(400, f"truncate_prompt_tokens: must be -1 or a positive integer, got {k}",
                       param="truncate_prompt_tokens", code="invalid_value")
    if k > limit:
        raise APIError(400, f"truncate_prompt_tokens: {k} is larger than this model's context ({limit} tokens)",
                       param="truncate_prompt_tokens", code="invalid_value")
    if len(ids) <= k:
        return ids
    return ids[:k] if req.truncation_side == "right" else ids[len(ids) - k:]


# ---- endpoints -------------------------------------------------------------------------------------


def build_app(state: ServerState) -> Starlette:
    def core_reader(name: str):
        """A reader of ``state.core``'s ``name()`` (None where the engine has none): ``prefill_gauges`` under serve
        --disagg (the prefill mesh's engine) and over workers (the decode workers' prefill workers), and
        ``worker_counts`` over workers."""
        def read():
            get = getattr(state.core, name, None)
            return get() if get is not None else None
        return read

    registry = make_registry(lambda: state.core.metrics if state.core is not None else None, state.model_name,
                             core_reader("prefill_gauges"), core_reader("worker_counts"))

    def endpoint(fn):
        async def wrapped(request: Request):
            try:
                return await fn(request)
            except APIError as e:
                return e.response()
            except ClientDisconnect:    # the client hung up before its request's body had arrived: no one to answer
                log.debug("client disconnected while sending %s", request.url.path)
                return Response(status_code=499)
            except Exception:  # a bug: log it, answer 500 without the traceback
                log.exception("internal error in %s", request.url.path)
                return APIError(500, "internal server error").response()
        return wrapped

    @endpoint
    async def health(request: Request):
        if state.ready():
            return Response(status_code=200)
        why = "loading" if state.engine is None and state.load_error is None else "engine not running"
        return JSONResponse({"status": why}, status_code=503)

    @endpoint
    async def version(request: Request):
        return JSONResponse({"version": jaxdyn.__version__})

    @endpoint
    async def models(request: Request):
        core = state.core
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [{
            "id": name, "object": "model", "created": created, "owned_by": "jaxdyn",
            "root": state.model_root, "max_model_len": core.max_model_len if core else None}
            for name in state.model_names]})

    @endpoint
    async def metrics(request: Request):
        return Response(render(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def tokenizer_request(request: Request, model):
        """(the body as ``model``, the engine, its tokenizer) for /tokenize and /detokenize: 400 without one."""
        req = _validate(model, await _read_json(request, state.max_request_bytes))
        engine = _require_engine(state)
        _check_model(state, req.model)
        tok = engine.core.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer", code="no_tokenizer")
        return req, engine, tok

    @endpoint
    async def tokenize(request: Request):
        req, engine, tok = await tokenizer_request(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:      # vLLM's defaults: a prompt's special tokens added, a chat's not
            ids = await _encode(tok, req.prompt, add_special_tokens=req.add_special_tokens is not False)
        else:
            if req.chat_template is not None:
                raise APIError(400, f"chat_template: {UNSUPPORTED['chat_template']} is not supported by this server",
                               param="chat_template", code="unsupported")
            ids = await _chat_prompt_ids(engine, req.messages, bool(req.add_generation_prompt),
                                         req.chat_template_kwargs or {}, bool(req.continue_final_message),
                                         tools=req.tools, documents=req.documents,
                                         add_special_tokens=bool(req.add_special_tokens))
        return JSONResponse({"count": len(ids), "max_model_len": engine.core.max_model_len, "tokens": ids})

    @endpoint
    async def detokenize(request: Request):
        req, _, tok = await tokenizer_request(request, DetokenizeRequest)
        if any(t < 0 or t >= tok.vocab_size for t in req.tokens):
            raise APIError(400, f"tokens: ids must be in [0, {tok.vocab_size})", param="tokens")
        return JSONResponse({"prompt": tok.decode(req.tokens, skip_special_tokens=False)})

    @endpoint
    async def completions(request: Request):
        data = await _read_json(request, state.max_request_bytes)
        req = _validate(CompletionRequest, data)
        _refuse_unsupported(req)
        _check_request_fields(req)
        engine = _require_engine(state)
        model_name = _check_model(state, req.model)
        tok = engine.core.tokenizer
        # prompt: a string, strings, token ids, or lists of token ids
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif isinstance(p, list) and p and isinstance(p[0], int):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "prompt: the prompt is empty", param="prompt", code="invalid_value")
        prompt_ids, prompt_texts = [], []
        for x in prompts:
            if isinstance(x, str):
                if tok is None:
                    raise APIError(400, "prompt: this model has no tokenizer; send token ids", param="prompt")
                ids = await _encode(tok, x, add_special_tokens=req.add_special_tokens is not False)
                if not ids:        # "" is served where the tokenizer adds a BOS (vLLM's), refused where it has none
                    raise APIError(400, "prompt: the prompt is empty (no tokens)", param="prompt",
                                   code="invalid_value")
                prompt_ids.append(ids)
                prompt_texts.append(x)
            else:
                prompt_ids.append(list(x))
                prompt_texts.append(None)       # echoed: decoded once the ids are checked
        for j, ids in enumerate(prompt_ids):
            cut = _truncate_prompt(engine, ids, req)
            if len(cut) != len(ids):
                prompt_ids[j] = cut
                prompt_texts[j] = None
        if req.suffix:
            raise APIError(400, "suffix: not supported", param="suffix")
        # echo with logprobs: the prompt's tokens get theirs too (vLLM: prompt logprobs of the same count, unless
        # prompt_logprobs is given)
        echo_lps = bool(req.echo) and req.logprobs is not None
        # echo with max_tokens 0 (vLLM's echo without generation, lm-eval's scoring form): the prompt alone is
        # returned; one token is drawn, as the engine must, and left out
        echo_only = bool(req.echo) and req.max_tokens == 0
        # max_tokens left out: 16 (OpenAI's and vLLM's default); given as null: up to the context's end (vLLM)
        max_tokens = req.max_tokens if "max_tokens" in req.model_fields_set else 16
        params = _sampling_params(req, max_tokens=1 if echo_only else max_tokens,
                                  logprobs=req.logprobs, defaults=state.sampling_defaults,
                                  prompt_logprobs=req.logprobs if echo_lps and req.prompt_logprobs is None else None)
        for ids in prompt_ids:
            _check(engine, ids, params)
            _check_room(engine, ids, req.max_tokens, "max_tokens")
        for j, text in enumerate(prompt_texts):
            if text is None:    # echoed: what the model was given (a truncated text prompt's without the BOS added)
                prompt_texts[j] = (tok.decode(prompt_ids[j], skip_special_tokens=isinstance(prompts[j], str))
                                   if tok and req.echo else "")
        _admit(state, engine, len(prompt_ids) * params.n)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        gens = _add_requests(engine, prompt_ids, params, rid, req.priority or 0)
        n = params.n
        echo = bool(req.echo)
        as_ids = bool(req.return_tokens_as_token_ids)

        def choice_text(i, c, first):
            return (prompt_texts[i] if echo and first else "")

        def shown(c):
            """The choice as returned: without its one token where the request echoes without generating."""
            if not echo_only:
                return c
            lps = None if c.logprobs is None else []
            return CompletionOutput(c.index, "", [], "", [], None if c.cumulative_logprob is None else 0.0, lps, lps,
                                    "length" if c.finish_reason else None, None)

        plps: dict[int, list] = {}          # each prompt's logprobs, from the output that carried them

        def prompt_lps(i, out):
            if out.prompt_logprobs is not None:
                plps[i] = out.prompt_logprobs

        def echoed_logprobs(i, c, token_ids, lps, offset):
            """A choice's logprobs, its echoed prompt's first when ``offset`` is None (they start the choice)."""
            if offset is None:
                if echo_lps:
                    token_ids, lps = [*prompt_ids[i], *token_ids], [*plps[i], *lps]
                offset = 0
            return _completion_logprobs(tok, token_ids, lps, offset, as_ids)

        if req.stream:
            include_usage, continuous_usage = _usage_options(req)

            async def stream():
                finals: dict[int, RequestOutput] = {}
                started: set[int] = set()
                ended: set[int] = set()
                token_offset: dict[int, int] = {}     # text_offset of each choice's next token (as unstreamed)
                generated: dict[int, int] = {}        # tokens so far by choice (continuous_usage_stats)
                try:
                    async for i, out in _merge(gens):
                        prompt_lps(i, out)
                        for c in map(shown, out.outputs):
                            idx = i * n + c.index
                            if idx in ended or not (c.delta_text or c.delta_token_ids or c.finish_reason):
                                continue
                            if c.finish_reason:
                                ended.add(idx)
                            first = idx not in started
                            started.add(idx)
                            ch = {"index": idx, "text": choice_text(i, c, first) + c.delta_text,
                                  "logprobs": None, "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason}
                            if c.delta_logprobs is not None:
                                ch["logprobs"], token_offset[idx] = echoed_logprobs(
                                    i, c, c.delta_token_ids, c.delta_logprobs, None if first else token_offset[idx])
                            obj = {"id": rid, "object": "text_completion", "created": created,
                                   "model": model_name, "choices": [ch]}
                            generated[idx] = generated.get(idx, 0) + len(c.delta_token_ids)
                            if continuous_usage:
                                obj["usage"] = _usage_so_far(len(prompt_ids[i]), generated[idx])
                            yield _sse(obj)
                        if out.finished:
                            finals[i] = out
                    if include_usage:
                        yield _sse({"id": rid, "object": "text_completion", "created": created,
                                    "model": model_name, "choices": [],
                                    "usage": _usage([len(x) for x in prompt_ids], list(finals.values()),
                                                    sum(o.num_cached_tokens for o in finals.values()),
                                                    not echo_only)})
                except (RequestError, EngineDeadError, SamplingParamsError, RequestFailedError) as e:
                    yield _sse(_stream_error(e).body())
                yield _DONE

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def collect():
            finals: dict[int, RequestOutput] = {}
            async for i, out in _merge(gens):
                if out.finished:
                    finals[i] = out
            return finals

        finals = await _run_collect(request, collect)
        choices = []
        for i in range(len(prompt_ids)):
            prompt_lps(i, finals[i])
            for c in map(shown, finals[i].outputs):
                ch = {"index": i * n + c.index, "text": (prompt_texts[i] if echo else "") + c.text,
                      "logprobs": None, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if c.logprobs is not None:
                    ch["logprobs"] = echoed_logprobs(i, c, c.token_ids, c.logprobs, None)[0]
                if params.prompt_logprobs is not None:       # asked, or echo with logprobs (vLLM's choice field)
                    ch["prompt_logprobs"] = _prompt_logprobs_json(tok, plps.get(i))
                choices.append(ch)
        outs = [finals[i] for i in range(len(prompt_ids))]
        return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                             "model": model_name, "choices": choices,
                             "usage": _usage([len(x) for x in prompt_ids], outs,
                                             sum(o.num_cached_tokens for o in outs), not echo_only)})

    @endpoint
    async def chat_completions(request: Request):
        data = await _read_json(request, state.max_request_bytes)
        req = _validate(ChatCompletionRequest, data)
        parsing = _tool_parsing(req, state.tool_parser)
        _refuse_unsupported(req, parsing)
        _check_request_fields(req)
        engine = _require_engine(state)
        model_name = _check_model(state, req.model)
        tok = engine.core.tokenizer
        parser = state.tool_parser if parsing else None
        if req.top_logprobs and not req.logprobs:           # 0 without logprobs asks for nothing: served (vLLM)
            raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs: must be an integer in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                           param="top_logprobs", code="invalid_value")
        if req.continue_final_message and req.add_generation_prompt is not False:
            raise APIError(400, "continue_final_message: cannot be used with add_generation_prompt; set "
                           "add_generation_prompt to false", param="continue_final_message")
        ids = await _chat_prompt_ids(engine, req.messages, req.add_generation_prompt is not False,
                                     req.chat_template_kwargs or {}, bool(req.continue_final_message),
                                     tools=req.tools, documents=req.documents,
                                     add_special_tokens=bool(req.add_special_tokens))
        ids = _truncate_prompt(engine, ids, req)
        as_ids = bool(req.return_tokens_as_token_ids)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        try:
            params = _sampling_params(req, max_tokens=max_tokens,
                                      logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                      defaults=state.sampling_defaults)
        except APIError as e:
            if e.param == "max_tokens" and req.max_completion_tokens is not None:
                e.param = "max_completion_tokens"
                e.message = e.message.replace("max_tokens", "max_completion_tokens", 1)
            raise
        if parser is not None and params.skip_special_tokens and parser.needs_special_tokens(tok):
            params = dataclasses.replace(params, skip_special_tokens=False)   # the calls' tags are special tokens
        _check(engine, ids, params, param_prefix="messages")
        _check_room(engine, ids, max_tokens,
                    "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
        _admit(state, engine, params.n)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        gen = engine.stream(engine.add_request(ids, params, rid, priority=req.priority or 0))
        top_n = req.top_logprobs or 0
        prefix = ""
        if req.echo and req.messages[-1].role == "assistant":
            prefix = message_text(req.messages[-1].content)

        if req.stream:
            include_usage, continuous_usage = _usage_options(req)
            generated = [0] * params.n              # tokens so far by choice (continuous_usage_stats)

            def chunk(choices, usage=None):
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created,
                       "model": model_name, "choices": choices}
                if usage is None and continuous_usage and len(choices) == 1:
                    usage = _usage_so_far(len(ids), generated[choices[0]["index"]])
                if usage is not None:
                    obj["usage"] = usage
                return _sse(obj)

            # tool calls read out of each choice's text: content passes as it comes, a call once the choice ends
            calls_of = [ToolCallStream(parser) for _ in range(params.n)] if parser else None

            async def stream():
                final = None
                ended: set[int] = set()
                try:
                    for i in range(params.n):
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": prefix},
                                      "logprobs": None, "finish_reason": None}])
                    async for _, out in _merge([gen]):
                        for c in out.outputs:
                            if c.index in ended:
                                continue
                            if c.delta_text or c.delta_token_ids:
                                generated[c.index] += len(c.delta_token_ids)
                                text = calls_of[c.index].feed(c.delta_text) if calls_of else c.delta_text
                                ch = {"index": c.index, "delta": {"content": text}, "logprobs": None,
                                      "finish_reason": None}
                                if c.delta_logprobs is not None:
                                    ch["logprobs"] = _chat_logprobs(tok, c.delta_token_ids, c.delta_logprobs, top_n,
                                                                    as_ids)
                                if text or ch["logprobs"] is not None or not calls_of:
                                    yield chunk([ch])    # (not for a tool call's text held back, as vLLM's)
                            if c.finish_reason:          # each choice's end as it ends
                                ended.add(c.index)
                                reason = c.finish_reason
                                if calls_of:
                                    rest, calls = calls_of[c.index].finish()
                                    calls = _allowed_calls(calls, req)
                                    if rest:
                                        yield chunk([{"index": c.index, "delta": {"content": rest}, "logprobs": None,
                                                      "finish_reason": None}])
                                    if calls:
                                        reason = "tool_calls"
                                        yield chunk([{"index": c.index, "delta": {"tool_calls": [
                                            call.to_json(k) for k, call in enumerate(calls)]}, "logprobs": None,
                                            "finish_reason": None}])
                                yield chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                              "finish_reason": reason, "stop_reason": c.stop_reason}])
                        if out.finished:
                            final = out
                    if include_usage:
                        yield chunk([], _usage([len(ids)], [final], final.num_cached_tokens))
                except (RequestError, EngineDeadError, RequestFailedError) as e:
                    yield _sse(_stream_error(e).body())
                yield _DONE

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def collect():
            final = None
            async for out in gen:
                if out.finished:
                    final = out
            return final

        final = await _run_collect(request, collect)
        choices = []
        for c in final.outputs:
            ch = {"index": c.index, "message": {"role": "assistant", "content": prefix + c.text},
                  "logprobs": None, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if parser is not None:
                content, calls = parser.parse(c.text)
                calls = _allowed_calls(calls, req)
                if calls:
                    ch["message"] = {"role": "assistant", "content": prefix + content if content else (prefix or None),
                                     "tool_calls": [call.to_json() for call in calls]}
                    ch["finish_reason"] = "tool_calls"
            if c.logprobs is not None:
                ch["logprobs"] = _chat_logprobs(tok, c.token_ids, c.logprobs, top_n, as_ids)
            choices.append(ch)
        body = {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": _usage([len(ids)], [final], final.num_cached_tokens)}
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = _prompt_logprobs_json(tok, final.prompt_logprobs)
        return JSONResponse(body)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ping", health, methods=["GET", "POST"]),       # vLLM's (SageMaker's probe): /health's answer
        Route("/version", version, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes)

    async def not_found(request, exc):
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found",
                        type_="not_found_error").response()

    async def not_allowed(request, exc):
        return APIError(405, f"method {request.method} not allowed on {request.url.path}",
                        code="method_not_allowed").response()

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_allowed)
    app.state.jaxdyn = state
    return app


async def _run_collect(request: Request, collect):
    try:
        return await _until_disconnect(request, collect())
    except RequestError as e:
        raise APIError(400, f"{e.param}: {e}", param=e.param, code="invalid_value") from None
    except ShutdownError as e:
        raise APIError(503, str(e), code="server_shutting_down", type_="service_unavailable") from None
    except EngineDeadError as e:
        raise APIError(503, str(e), code="engine_dead", type_="service_unavailable") from None
    except RequestFailedError as e:
        raise APIError(500, str(e), code="request_failed") from None


def _stream_error(e: Exception) -> APIError:
    """The error event that ends a stream whose request failed after the response began."""
    if isinstance(e, ShutdownError):
        return APIError(503, str(e), code="server_shutting_down", type_="service_unavailable")
    if isinstance(e, (RequestError, SamplingParamsError)):
        return APIError(400, str(e), param=getattr(e, "param", None))
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e), code="request_failed")
    return APIError(503, str(e), code="engine_dead", type_="service_unavailable")


async def _chat_prompt_ids(engine: AsyncEngine, messages, add_generation_prompt: bool, kwargs: dict,
                           continue_final_message: bool = False, tools: list | None = None,
                           documents: list | None = None, add_special_tokens: bool = False) -> list[int]:
    """The prompt's ids (``jaxdyn.engine.chat.chat_prompt``'s text, tokenized without special tokens unless
    ``add_special_tokens``: the template writes BOS itself); a chat that cannot be rendered is a 400 naming the
    field to blame."""
    tok = engine.core.tokenizer
    try:
        text = chat_prompt(tok, [{"role": m.role, "content": m.content, "name": m.name, "tool_calls": m.tool_calls,
                                  "tool_call_id": m.tool_call_id} for m in messages],
                           add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                           chat_template_kwargs=kwargs, tools=tools, documents=documents)
    except ChatTemplateError as e:
        code = "no_chat_template" if tok is not None and not tok.chat_template else None
        raise APIError(400, str(e), param=e.param, code=code) from None
    return await _encode(tok, text, add_special_tokens=add_special_tokens)
