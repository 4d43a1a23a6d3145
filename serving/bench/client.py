"""One streamed request to an OpenAI-compatible server (completions or chat), timed chunk by chunk.

TTFT is the time to the first chunk that carries output (a chat stream's
opening role-only chunk and a closing finish-only chunk carry none); ITLs are
the gaps between such chunks (a chunk may carry several tokens, as in vLLM's
benchmark); E2E runs to the end of the response body. Output tokens come from
the server's usage (``stream_options.include_usage``), else from the
tokenizer over the streamed text, else the count of output chunks; prompt
tokens from usage, else from the caller's count. Every failure (HTTP status,
connection error, error event, stream without ``[DONE]``, timeout) ends in
``record.error``; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where and how requests are sent."""
    base_url: str                     # http://host:port (no /v1)
    kind: str                         # "completions" | "chat"
    model: str
    temperature: float = 0.0
    top_p: float = 1.0                # 1: not sent
    top_k: int = 0                    # 0 or -1: not sent (a jaxdyn / vLLM extension of the API)
    ignore_eos: bool = True
    stream_usage: bool = True         # ask for usage in the stream (stream_options.include_usage)
    timeout: float = 600.0            # seconds per request, whole stream
    api_key: str | None = None

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINTS[self.kind]

    def payload(self, prompt, max_tokens: int) -> dict:
        """prompt: completions: text or token ids; chat: a list of messages."""
        body = {"model": self.model, "temperature": self.temperature, "stream": True}
        if self.kind == "chat":
            body["messages"] = prompt
            body["max_completion_tokens"] = max_tokens
        else:
            body["prompt"] = prompt
            body["max_tokens"] = max_tokens
        if self.top_p < 1.0:
            body["top_p"] = self.top_p
        if self.top_k > 0:
            body["top_k"] = self.top_k
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.stream_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclasses.dataclass
class RequestRecord:
    index: int                          # position in the dataset
    prompt_len: int | None = None       # prompt tokens (see prompt_token_source)
    max_tokens: int | None = None       # output tokens asked for
    output_tokens: int = 0              # output tokens (see token_source)
    start: float = 0.0                  # seconds after the run began
    ttft: float | None = None           # seconds
    itls: list[float] = dataclasses.field(default_factory=list)   # seconds between output chunks
    e2e: float | None = None            # seconds
    success: bool = False
    error: str | None = None
    token_source: str | None = None     # output count from: usage | tokenizer | chunks
    prompt_token_source: str | None = None   # usage | tokenizer | estimate (words)
    cached_tokens: int | None = None    # prompt tokens the server found in its prefix cache (usage)
    conversation: int | None = None
    turn: int | None = None
    text: str = ""                      # generated text (multi-turn history; not saved)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output tokens - 1)."""
        if not self.success or self.output_tokens < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "text"}
        for k in ("start", "ttft", "e2e"):
            d[k] = None if d[k] is None else round(d[k], 6)
        d["itls"] = [round(x, 6) for x in self.itls]
        tpot = self.tpot
        d["tpot"] = None if tpot is None else round(tpot, 6)
        return d


def _aborted(obj: dict) -> bool:
    """Whether a streamed chunk (one ``_chunk_output`` read) ends its choice as aborted by the server (vLLM's
    finish_reason "abort", SGLang's ``{"type": "abort"}``): such a request failed, its output cut short."""
    reason = obj["choices"][0].get("finish_reason")
    return reason == "abort" or (isinstance(reason, dict) and reason.get("type") == "abort")


def _chunk_output(obj: dict, chat: bool) -> tuple[bool, str]:
    """(whether the chunk carries output, its text) for one streamed chunk with choices."""
    choice = obj["choices"][0]
    finished = choice.get("finish_reason") is not None
    if chat:
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""
        carries = bool(text) or ("content" in delta and "role" not in delta and not finished)
    else:
        text = choice.get("text") or ""
        carries = bool(text) or not finished
    if not isinstance(text, str):
        raise TypeError(f"its text is a {type(text).__name__}, not a string")
    return carries, text


def _error_message(body: bytes) -> str:
    try:
        obj = json.loads(body)
        err = obj.get("error", obj)
        msg = err.get("message", err) if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        msg = body.decode(errors="replace")
    return str(msg).strip()[:300]


async def _events(response: httpx.Response):
    """Server-Sent Events: yields (arrival time, data) for each event, data lines joined."""
    data: list[str] = []
    async for line in response.aiter_lines():
        now = time.perf_counter()
        if not line:
            if data:
                yield now, "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield time.perf_counter(), "\n".join(data)


async def send(client: httpx.AsyncClient, endpoint: Endpoint, prompt, max_tokens: int,
               record: RequestRecord, *, t0: float, tokenizer=None) -> RequestRecord:
    """Send one streamed request and fill ``record`` (its prompt_len is the caller's count until usage
    replaces it). ``t0``: the run's start (perf_counter) for ``record.start``."""
    chat = endpoint.kind == "chat"
    chunks = 0
    usage = None
    done = False
    texts: list[str] = []
    last = None
    start = time.perf_counter()
    record.start = start - t0
    record.max_tokens = max_tokens
    try:
        async with asyncio.timeout(endpoint.timeout):
            async with client.stream("POST", endpoint.url, json=endpoint.payload(prompt, max_tokens),
                                     headers=endpoint.headers()) as response:
                if response.status_code != 200:
                    body = await response.aread()
                    record.error = f"HTTP {response.status_code}: {_error_message(body)}"
                    return record
                async for now, data in _events(response):
                    if data == "[DONE]":
                        done = True
                        continue
                    try:
                        obj = json.loads(data)
                    except (json.JSONDecodeError, RecursionError):      # (nested past the parser's depth)
                        record.error = f"malformed event: {data[:200]!r}"
                        return record
                    if not isinstance(obj, dict):
                        record.error = f"malformed event: {data[:200]!r}"
                        return record
                    if "error" in obj or obj.get("object") == "error":
                        record.error = f"error event: {_error_message(data.encode())}"
                        return record
                    if obj.get("usage"):
                        usage = obj["usage"]
                    if not obj.get("choices"):
                        continue
                    try:
                        carries, text = _chunk_output(obj, chat)
                    except (AttributeError, KeyError, TypeError, IndexError):
                        record.error = f"malformed event: {data[:200]!r}"
                        return record
                    if _aborted(obj):      # vLLM's "abort" finish, SGLang's {"type": "abort"}: not an output
                        record.error = f"the server aborted the request: {data[:200]!r}"
                        return record
                    if not carries:
                        continue
                    texts.append(text)
                    chunks += 1
                    if record.ttft is None:
                        record.ttft = now - start
                    else:
                        record.itls.append(now - last)
                    last = now
            record.e2e = time.perf_counter() - start
    except TimeoutError:
        record.error = f"timeout after {endpoint.timeout:g} s"
        return record
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return record
    record.text = "".join(texts)
    if not done:
        record.error = "the stream ended without data: [DONE]"
        return record
    if chunks == 0:
        record.error = "no output in the stream"
        return record
    if usage is not None and not isinstance(usage, dict):
        record.error = f"malformed usage: {str(usage)[:200]!r}"
        return record
    try:
        if usage and usage.get("completion_tokens") is not None:
            output_tokens, source = _count(usage["completion_tokens"]), "usage"
        elif tokenizer is not None:
            output_tokens, source = len(tokenizer.encode(record.text, add_special_tokens=False)), "tokenizer"
        else:
            output_tokens, source = chunks, "chunks"
        prompt = cached = None
        if usage and usage.get("prompt_tokens") is not None:
            prompt = _count(usage["prompt_tokens"])
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                cached = _count(details["cached_tokens"])
    except (ValueError, TypeError, AttributeError):
        record.error = f"malformed usage: {str(usage)[:200]!r}"
        return record
    record.success = True
    record.output_tokens, record.token_source = output_tokens, source
    if prompt is not None:
        record.prompt_len, record.prompt_token_source = prompt, "usage"
    if cached is not None:
        record.cached_tokens = cached
    return record


def _count(v) -> int:
    """A usage count: an integer >= 0 (ValueError otherwise: a malformed usage fails its request)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"not a token count: {v!r}")
    return v
