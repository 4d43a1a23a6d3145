"""A fake OpenAI-compatible streaming server with injected delays and failures, for the benchmark tests.

Each request streams ``max_tokens`` chunks of one token ("t<request>.<k> "):
the first after ``ttft(n)`` seconds, the others ``itl`` apart, then a finish
chunk, a usage chunk when asked (``stream_options.include_usage``) and
``[DONE]``. ``n`` is the request's arrival number at the server (1, 2, ...).
The server records every request body and the peak number of requests in
flight.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_tokens(body: dict) -> int:
    """What the fake reports as usage.prompt_tokens: words of the prompt (or of every message) + 1."""
    if "messages" in body:
        return sum(len(m["content"].split()) for m in body["messages"]) + 1
    p = body["prompt"]
    return (len(p) if isinstance(p, list) else len(p.split())) + 1


class FakeOpenAI:
    def __init__(self, *, ttft=0.05, itl=0.01, model="fake"):
        self.ttft = ttft if callable(ttft) else (lambda n, t=ttft: t)
        self.itl = itl
        self.model = model
        self.fail_every = 0          # every k-th request answers HTTP 500
        self.error_event_every = 0   # every k-th request sends an error event after two tokens
        self.hang_every = 0          # every k-th request sends one token, then nothing for 30 s
        self.usage = True            # honour stream_options.include_usage
        self.malformed_every = 0     # every k-th request sends a chunk whose choice is null after one token
        self.bad_usage_every = 0     # every k-th request reports a usage whose completion_tokens is not a number
        self.abort_every = 0         # every k-th request ends with finish_reason "abort" (vLLM's aborted request)
        self.nested_every = 0        # every k-th request sends an event nested past the JSON parser's depth
        self.bodies: list[dict] = []
        self.count = 0
        self.active = 0
        self.peak = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/v1/models", self._models, methods=["GET"]),
                                Route("/v1/completions", self._complete, methods=["POST"]),
                                Route("/v1/chat/completions", self._complete, methods=["POST"])])
        # log_config None: uvicorn's default config would bind its handlers to the sys.stderr of the moment, a
        # test's capsys stream, closed after that test (pytest's own capture then failed when a test ran alone)
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     log_config=None))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self):
        self._thread.start()
        for _ in range(200):
            if self._server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("the fake server did not start")

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(10)

    async def _models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _complete(self, request: Request):
        body = await request.json()
        self.count += 1
        n = self.count
        self.bodies.append(body)
        if self.fail_every and n % self.fail_every == 0:
            return JSONResponse({"error": {"message": f"injected failure of request {n}", "type": "server_error",
                                           "param": None, "code": None}}, status_code=500)
        chat = "messages" in body
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        include_usage = self.usage and (body.get("stream_options") or {}).get("include_usage")

        def chunk(text=None, finish=None, usage=None, role=False):
            if usage is not None:
                obj = {"choices": [], "usage": usage}
            elif chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                obj = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            else:
                obj = {"choices": [{"index": 0, "text": text or "", "finish_reason": finish}]}
            return f"data: {json.dumps({'id': f'x{n}', 'model': self.model, **obj})}\n\n"

        async def stream():
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                if chat:
                    yield chunk(role=True)
                await asyncio.sleep(self.ttft(n))
                for k in range(max_tokens):
                    if k:
                        await asyncio.sleep(self.itl)
                    if self.error_event_every and n % self.error_event_every == 0 and k == 2:
                        yield f"data: {json.dumps({'error': {'message': f'injected error event {n}'}})}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    if self.hang_every and n % self.hang_every == 0 and k == 1:
                        await asyncio.sleep(30)
                    if self.malformed_every and n % self.malformed_every == 0 and k == 1:
                        bad = [None] if n % 2 else [{"index": 0, "text": 5, "delta": {"content": 7}}]
                        yield f"data: {json.dumps({'id': f'x{n}', 'choices': bad})}\n\n"
                    if self.nested_every and n % self.nested_every == 0 and k == 1:
                        yield "data: " + "[" * 100_000 + "\n\n"
                    yield chunk(f"t{n}.{k} ")
                yield chunk(finish="abort" if self.abort_every and n % self.abort_every == 0 else "length")
                if include_usage:
                    p = prompt_tokens(body)
                    bad = self.bad_usage_every and n % self.bad_usage_every == 0
                    yield chunk(usage={"prompt_tokens": p, "completion_tokens": "n/a" if bad else max_tokens,
                                       "total_tokens": p + max_tokens})
                yield "data: [DONE]\n\n"
            finally:
                self.active -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")
