"""The OpenAI server, started for real on a localhost port and driven by the openai client and httpx."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from checkpoints.loader import load_model
from jaxdyn import AsyncEngine, EngineConfig, EngineCore
from serving.app import ServerState, build_app
from tests.support import make_byte_tokenizer, make_hf_checkpoint

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
CFG = EngineConfig(num_pages=160, page_size=16, max_num_batched_tokens=64, max_num_seqs=16,
                   max_model_len=128, fail_on_compile=True, seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_hf_checkpoint("qwen3", str(tmp_path_factory.mktemp("tiny-chat")))
    make_byte_tokenizer(path, chat_template=TEMPLATE)
    return path


class Server:
    def __init__(self, state: ServerState):
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(ckpt):
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, CFG)
    core.warmup()
    state = ServerState("tiny", max_queued_requests=64, max_request_bytes=64 << 10)
    state.engine = AsyncEngine(core)
    srv = Server(state)
    yield srv
    srv.stop()
    state.engine.shutdown()


@pytest.fixture(autouse=True)
def no_pages_left(request):
    yield
    if "server" in request.fixturenames:
        core = request.getfixturevalue("server").state.core
        for _ in range(300):
            if not core.requests and core.allocator.num_in_use == 0:
                break
            time.sleep(0.02)
        assert core.allocator.num_in_use == 0, "KV pages leaked"
        assert core.metrics.compilations_after_warmup == 0


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})


def test_completions_max_tokens_left_out_is_16_and_null_is_the_context_s_end(server):
    """As vLLM: a completion's max_tokens left out is 16, given as null it is what the context leaves after the
    prompt (max_model_len 128, "x" is <s> + 1 byte: 126)."""
    body = {"model": "tiny", "prompt": "x", "temperature": 0, "ignore_eos": True}
    for extra, want in (({}, 16), ({"max_tokens": None}, 126)):
        r = httpx.post(server.url + "/v1/completions", json={**body, **extra}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == want, extra
        assert r.json()["choices"][0]["finish_reason"] == "length"


def test_an_empty_prompt_string_is_its_bos_token(server):
    """vLLM serves prompt "" as what the tokenizer makes of it (<s> here); it was refused by its characters. With no
    tokens at all (add_special_tokens false) it is still refused (in BAD)."""
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "", "max_tokens": 2,
                                                          "temperature": 0, "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {**r.json()["usage"], "prompt_tokens": 1, "completion_tokens": 2}


def test_whole_number_floats_are_taken_for_integer_fields(server):
    """vLLM takes max_tokens 2.0 and n 1.0 as 2 and 1 (a client computing them as floats); they were refused."""
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2.0, "n": 1.0, "seed": 3.0, "temperature": 0,
            "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2 and len(r.json()["choices"]) == 1


def test_completions_with_the_openai_client(server):
    c = client(server)
    r = c.completions.create(model="tiny", prompt="Hello", **GREEDY)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 6        # <s> + 5 bytes
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    text = r.choices[0].text
    parts = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="Hello", stream=True, **GREEDY)]
    assert "".join(parts) == text
    # token-id prompts, several prompts, n, echo
    r = c.completions.create(model="tiny", prompt=[[256, 72], [256, 73]], n=2, **GREEDY)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2, 3]
    r = c.completions.create(model="tiny", prompt="Hi", echo=True, **GREEDY)
    assert r.choices[0].text.startswith("Hi")
    assert [m.id for m in c.models.list().data] == ["tiny"]


def test_usage_reports_cached_tokens_of_a_repeated_prefix(server):
    c = client(server)
    system = "You are a helpful assistant who answers briefly. "
    # Rendered: <s> "system: " + 49 bytes + "\nuser: " = 65 tokens in common -> 4 whole pages of 16.
    first = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": system},
                                                              {"role": "user", "content": "one"}], **GREEDY)
    again = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": system},
                                                              {"role": "user", "content": "two"}], **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 64
    text = httpx.get(server.url + "/metrics").text
    hits = [s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "jaxdyn:prefix_cache_hits_total"]
    assert hits and hits[0] >= 64
    assert "prefill_role" not in text         # one engine: no prefill mesh's gauges


def test_chat_with_the_openai_client_sync_and_async(server):
    c = client(server)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, logprobs=True, top_logprobs=3, **GREEDY)
    m = r.choices[0]
    assert m.message.role == "assistant" and m.finish_reason == "length"
    assert len(m.logprobs.content) == 8 and len(m.logprobs.content[0].top_logprobs) == 3
    stream = c.chat.completions.create(model="tiny", messages=msgs, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == m.message.content
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices == []

    async def many():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        rs = await asyncio.gather(*[ac.chat.completions.create(model="tiny", messages=msgs, **GREEDY)
                                    for _ in range(4)])
        await ac.close()
        return rs
    assert all(x.choices[0].message.content == m.message.content for x in asyncio.run(many()))


def test_raw_sse_framing(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "yo"}], "stream": True,
            "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    finals = [p for p in payloads if p["choices"] and p["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert payloads[-1]["usage"]["completion_tokens"] == 4


def _sse_payloads(url, path, body):
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def test_streams_keep_logprob_offsets_give_usage_each_chunk_and_end_each_choice_as_it_ends(server):
    """Streamed completions' logprobs text_offset continue from the text already sent (the same as unstreamed);
    stream_options.continuous_usage_stats puts each choice's usage so far in every chunk (vLLM); a chat stream
    of n choices sends each choice's finish chunk when that choice ends, and one role chunk a choice."""
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    chunks = _sse_payloads(server.url, "/v1/completions", {
        **body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    offsets = [o for c in chunks if c["choices"] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == whole["text_offset"] and len(set(offsets)) > 1
    so_far = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert so_far == sorted(so_far) and so_far[-1] == 6
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {chunks[-1]["usage"]["prompt_tokens"]}
    plain = _sse_payloads(server.url, "/v1/completions", {**body, "stream": True})
    assert all("usage" not in c for c in plain)

    # chat, n=2: a role chunk and a finish chunk a choice, each finish chunk with its choice's usage
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "yo"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "n": 2, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = _sse_payloads(server.url, "/v1/chat/completions", chat)
    roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert sorted(c["choices"][0]["index"] for c in roles) == [0, 1] and all(len(c["choices"]) == 1 for c in roles)
    ends = [i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(chunks[i]["choices"][0]["index"] for i in ends) == [0, 1]
    for i in ends:          # the choice's finish chunk carries its own count so far: all of it
        assert chunks[i]["usage"]["completion_tokens"] == 8
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16


BAD = [
    ("/v1/completions", b"{not json", 400, None, "malformed JSON"),
    ("/v1/completions", [1, 2], 400, None, "must be an object"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 7}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", "logprobs"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-5"}, 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": "", "add_special_tokens": False}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {}, 400, "prompt", "prompt"),
    ("/v1/completions", {"prompt": "x" * 200}, 400, "prompt", "context"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt", "token ids"),
    # echoed token ids are checked before they are decoded for the echo (a negative or huge id was a 500)
    ("/v1/completions", {"prompt": [5, -1], "echo": True}, 400, "prompt", "token ids"),
    ("/v1/completions", {"prompt": [5, 2 ** 70], "echo": True}, 400, "prompt", "token ids"),
    ("/v1/completions", {"prompt": [5, 6, -1], "echo": True, "truncate_prompt_tokens": 2}, 400, "prompt",
     "token ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [70000]}, 400, "stop_token_ids", "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    # a whole-number float is taken for an integer field (below); a fraction, a string or a bool is not
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "x", "n": "2"}, 400, "n", "integer"),
    ("/v1/completions", {"prompt": "x", "seed": True}, 400, "seed", "integer"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages", "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages", "context"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs", "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"foo": 1}]}, 400,
     "tools", 'item 0 must be {"type": "function"'),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}]}, 400,
     "tools", "function.parameters must be a JSON Schema object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "bogus"}, 400,
     "tool_choice", 'must be "none", "auto", "required"'),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400,
     "messages", "a text part's text must be a string"),
    ("/v1/completions", {"prompt": "x" * (70 << 10)}, 413, None, "exceeds the limit"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "tokens"),
    # bodies that are JSON to a lenient parser but not to this server's reading of them
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', 400, None, "unpaired UTF-16 surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', 400, None, "surrogate"),
    ("/tokenize", b'{"prompt": ["\\ud83d"]}', 400, None, "surrogate"),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", 400, None, "malformed JSON"),
    ("/detokenize", b'{"tokens": [' + b"1" * 5000 + b"]}", 400, None, "malformed JSON"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 30000 + b"]" * 30000 + b"}", 400, None, "malformed JSON"),
    # a surrogate encoded in the body's UTF-8 or UTF-16, or escaped in a UTF-16 body: json.loads of the bytes took
    # each (a 500 at the tokenizer)
    ("/v1/completions", b'{"prompt": "a\xed\xa0\x80b"}', 400, None, "not UTF-8 text"),
    ("/tokenize", '{"prompt": "a\ud800b"}'.encode("utf-16-le", "surrogatepass"), 400, None, "not UTF-16-LE text"),
    ("/tokenize", '{"prompt": "a\\ud800b"}'.encode("utf-16"), 400, None, "unpaired UTF-16 surrogate"),
    # nested past MAX_JSON_DEPTH (64): a tool's schema this deep made the template's tojson recurse past the stack
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "none", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": json.loads('{"a": ' * 70 + "1" + "}" * 70)}}]},
     400, None, "nested more than 64 deep"),
    ("/v1/completions", {"prompt": "x", "extra": json.loads("[" * 64 + "]" * 64)}, 400, None,
     "nested more than 64 deep"),
    # a worker's gRPC field is int32: a priority past it was a 500 (or a stream cut off) at a front end over workers
    ("/v1/completions", {"prompt": "x", "priority": 2**31}, 400, "priority", "priority"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "priority": -2**31 - 1}, 400,
     "priority", "priority"),
    # vLLM's per-request chat template (refused there without --trust-request-chat-template): refused, not ignored
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 'hi' }}"}, 400,
     "chat_template", "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"chat_template": "{{ 'hi' }}"}}, 400, "chat_template_kwargs",
     "not supported"),
    # a min_tokens past the context's end (128 here) cannot be met, whatever max_tokens (a completion's default 16)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "min_tokens": 1000}, 400,
     "min_tokens", "exceeds the"),
    ("/v1/completions", {"prompt": [5] * 123, "min_tokens": 10}, 400, "min_tokens",
     "exceeds the 5 tokens the context leaves"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 'hi' }}"}, 400,
     "chat_template", "not supported"),
    # what a field must be, named
    ("/v1/completions", {"prompt": "x", "temperature": "1"}, 400, "temperature", "must be a number"),
    ("/v1/completions", {"prompt": "x", "top_p": "0.5"}, 400, "top_p", "must be a number"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "a list of token ids"),
    ("/v1/completions", {"prompt": ["a", 1]}, 400, "prompt", "a list of lists of token ids"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop", "a string or a list of strings"),
    ("/v1/completions", {"prompt": "x", "n": 129}, 400, "n", "at most 128"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed when stream is true"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options", "stream_options.include_usage"),
    # fields of OpenAI's or vLLM's API this server does not implement: refused by name, not ignored
    ("/v1/completions", {"prompt": "x", "logit_bias": {"five": 1}}, 400, "logit_bias", "is not a token id"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": "1"}}, 400, "logit_bias", "logit_bias.5"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 1}}, 400, "logit_bias", "token ids"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"100000": 1}}, 400, "logit_bias", "token ids must be in"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(40)}}, 400, "logit_bias",
     "at most"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of", "not supported"),
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": "object"}}, 400, "guided_json", "not supported"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True}, 400, "use_beam_search", "not supported"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, 400, "allowed_token_ids", "non-empty"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": ["a"]}, 400, "allowed_token_ids", "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [100000]}, 400, "allowed_token_ids",
     "token ids must be in"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "bad_words": ["s"]}, 400, "bad_words",
     "not supported"),
    ("/v1/completions", {"prompt": "x", "cache_salt": ""}, 400, "cache_salt", "non-empty string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "cache_salt": 5}, 400, "cache_salt",
     "cache_salt"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs", "in [0, 20]"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": -1}, 400, "prompt_logprobs", "in [0, 20]"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": "2"}, 400, "prompt_logprobs", "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs",
     "not available when stream is true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1, "stream": True},
     400, "prompt_logprobs", "not available when stream is true"),
    ("/v1/completions", {"prompt": "x", "spaces_between_special_tokens": False}, 400,
     "spaces_between_special_tokens", "not supported"),
    ("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens",
     "-1 or a positive integer"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "truncate_prompt_tokens": 129}, 400,
     "truncate_prompt_tokens", "larger than this model's context"),
    ("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 3, "truncation_side": "middle"}, 400,
     "truncation_side", "truncation_side"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "tool_choice", "needs tools"),
    # an explicit max_tokens the context cannot hold after the prompt (max_model_len 128; "x" is <s> + 1 byte)
    ("/v1/completions", {"prompt": "x", "max_tokens": 127}, 400, "max_tokens", "127 is too large: this model's "
     "context is 128 tokens and the prompt has 2 (127 > 128 - 2)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1000}, 400,
     "max_completion_tokens", "1000 is too large"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}, 400,
     "max_tokens", "1000 is too large"),
    # chat's own fields named as sent
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 25}, 400, "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, 400,
     "max_completion_tokens", "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"messages": 5}}, 400, "chat_template_kwargs",
     "set by the request itself"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                              "continue_final_message": True}, 400, "continue_final_message",
     "add_generation_prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True,
                              "add_generation_prompt": False}, 400, "continue_final_message", "assistant"),
    ("/v1/nothing", {}, 404, None, "no route"),
]


def test_bad_inputs_get_their_4xx_while_a_good_stream_completes(server):
    body = {"model": "tiny", "prompt": "steady", "stream": True, "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}
    result = {}

    def good():
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            result["events"] = r.read().decode().split("\n\n")

    t = threading.Thread(target=good)
    t.start()
    with httpx.Client(base_url=server.url, timeout=30) as h:
        for path, payload, status, param, message in BAD:
            content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            r = h.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == status, (path, payload, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert message in err["message"], (message, err)
            if param:
                assert err["param"] == param, err
    t.join(60)
    events = result["events"]
    assert events[-2] == "data: [DONE]"
    texts = [json.loads(e[6:])["choices"][0] for e in events[:-2]]
    assert texts[-1]["finish_reason"] == "length" and "error" not in events[-3]


def test_sixty_four_concurrent_streams_match_one_by_one_and_disconnects_free_pages(server):
    prompts = [f"p{i} " + "ab" * (i % 7) for i in range(64)]
    params = {"model": "tiny", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}

    async def one(h, prompt, cut=False):
        toks = []
        # a stream cut midway asks for 100 tokens: it can only end early by being aborted
        body = {**params, "prompt": prompt, **({"max_tokens": 100} if cut else {})}
        async with h.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    toks.append(json.loads(line[6:])["choices"][0]["text"])
                    if cut and len(toks) == 3:
                        return None                      # disconnect midway
        return "".join(toks)

    async def run(concurrent):
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as h:
            if not concurrent:
                return [await one(h, p) for p in prompts]
            return await asyncio.gather(*[one(h, p, cut=(i % 4 == 0)) for i, p in enumerate(prompts)])

    alone = asyncio.run(run(False))
    aborted = _abort_count(server)
    together = asyncio.run(run(True))
    for i, (a, b) in enumerate(zip(alone, together)):
        if i % 4:
            assert a == b, i
    assert sum(x is None for x in together) == 16
    _wait_idle(server)
    assert _abort_count(server) - aborted == 16       # each disconnect aborted its request
    # the fixture checks that every page came back


def _abort_count(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "jaxdyn:request_success_total" and smp.labels.get("finished_reason") == "abort":
                return smp.value
    return 0.0


def _wait_idle(server, seconds: float = 30.0) -> None:
    core = server.state.core
    deadline = time.monotonic() + seconds
    while core.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_non_streaming_client_that_disconnects_aborts_its_request(server):
    core = server.state.core
    real_step = core.step

    def slow_step():          # 120 tokens take >= 1.2 s: the request cannot finish before the client leaves
        time.sleep(0.01)
        return real_step()
    aborted = _abort_count(server)
    body = {"model": "tiny", "prompt": [256, 40, 41], "max_tokens": 120, "temperature": 0, "ignore_eos": True}
    core.step = slow_step
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.1))
        deadline = time.monotonic() + 30
        while _abort_count(server) == aborted and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        core.step = real_step
    assert _abort_count(server) == aborted + 1


def test_unknown_fields_are_ignored(server):
    r = httpx.post(server.url + "/v1/completions", json={
        "model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
        "frobnicate": {"x": 1}, "logit_bias_v2": [1, 2], "suffix_guard": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi", "extra": 1}], "max_tokens": 2,
        "temperature": 0, "parallel_tool_calls": False, "service_tier": "auto"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_what_the_refusals_leave_alone_is_served(server):
    """The values of the refused fields that ask for nothing unsupported, a top_k beyond any vocabulary (it once
    overflowed the step's int32 row and killed the engine), and an escaped surrogate pair (an emoji)."""
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as h:
        for extra in ({"response_format": {"type": "text"}}, {"tools": [{"type": "function", "function": {
                "name": "f"}}], "tool_choice": "none"}, {"best_of": 1}, {"logit_bias": {}}, {"logit_bias": None},
                {"use_beam_search": False}, {"top_logprobs": 0}):
            r = h.post("/v1/chat/completions", json={**chat, **extra})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, (extra, r.text)
        for top_k in (2**31, 2**63, 10**30):
            r = h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "top_k": top_k, "seed": 1})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
        assert h.get("/health").status_code == 200
        r = h.post("/v1/completions", content=b'{"prompt": "a\\ud83d\\ude00", "max_tokens": 1}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert h.post("/tokenize", json={"prompt": "a\U0001F600"}).json()["count"] == 1 + 1 + 4
        # a UTF-8 body with a byte order mark, and UTF-16 and UTF-32 ones (JSON's other encodings, as json.loads
        # takes them); the int32 bounds of priority; nesting at the depth limit (64)
        for encoding in ("utf-8", "utf-16", "utf-32-le"):
            body = '\ufeff{"prompt": "hi\u00e9", "max_tokens": 1}' if encoding == "utf-8" else \
                '{"prompt": "hi\u00e9", "max_tokens": 1}'
            r = h.post("/v1/completions", content=body.encode(encoding), headers={"content-type": "application/json"})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1 + 2 + 2, (encoding, r.text)
        for priority in (2**31 - 1, -2**31):
            r = h.post("/v1/chat/completions", json={**chat, "priority": priority})
            assert r.status_code == 200, r.text
        deep = json.loads('{"a": ' * 60 + "1" + "}" * 60)     # under the body, tools, a tool, its function: 64 deep
        r = h.post("/v1/chat/completions", json={**chat, "tool_choice": "none", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": deep}}]})
        assert r.status_code == 200, r.text


def test_continue_final_message_ends_the_prompt_with_the_final_messages_text(server):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    with httpx.Client(base_url=server.url, timeout=60) as h:
        cont = h.post("/tokenize", json={"messages": msgs, "continue_final_message": True,
                                         "add_generation_prompt": False}).json()["tokens"]
        whole = h.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()["tokens"]
        text = h.post("/detokenize", json={"tokens": cont}).json()["prompt"]
        assert text == "<s>user: hi\nassistant: The answer is"        # the template's "\n" after it cut
        assert whole == cont + [ord("\n")]
        # an empty final message: the assistant's turn starts, as with a generation prompt
        empty = h.post("/tokenize", json={"messages": [msgs[0], {"role": "assistant", "content": ""}],
                                          "continue_final_message": True, "add_generation_prompt": False})
        assert empty.json()["tokens"] == h.post("/tokenize", json={"messages": msgs[:1]}).json()["tokens"]
        # a final text that the template also writes after it (its closing "\n") is cut where the message ends
        nl = h.post("/tokenize", json={"messages": [msgs[0], {"role": "assistant", "content": "\n"}],
                                       "continue_final_message": True, "add_generation_prompt": False})
        assert h.post("/detokenize", json={"tokens": nl.json()["tokens"]}).json()["prompt"] == \
            "<s>user: hi\nassistant: \n"
        r = h.post("/tokenize", json={"messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        body = {"model": "tiny", "messages": msgs, "continue_final_message": True, "add_generation_prompt": False,
                "max_tokens": 4, "temperature": 0, "ignore_eos": True, "echo": True}
        r = h.post("/v1/chat/completions", json=body).json()
        assert r["usage"]["prompt_tokens"] == len(cont) and r["choices"][0]["message"]["content"].startswith(
            "The answer is")
        same = h.post("/v1/completions", json={"prompt": cont, "max_tokens": 4, "temperature": 0,
                                                "ignore_eos": True}).json()
        assert r["choices"][0]["message"]["content"] == "The answer is" + same["choices"][0]["text"]


def test_async_openai_client_streams_completions_and_chat(server):
    c = client(server)
    ref = c.completions.create(model="tiny", prompt="stream me", max_tokens=6, temperature=0,
                               extra_body={"ignore_eos": True}).choices[0].text
    msgs = [{"role": "user", "content": "hello"}]
    ref_chat = c.chat.completions.create(model="tiny", messages=msgs, **GREEDY).choices[0].message.content

    async def go():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        try:
            done = await ac.completions.create(model="tiny", prompt="stream me", max_tokens=6, temperature=0,
                                               extra_body={"ignore_eos": True})
            text = ""
            async for ch in await ac.completions.create(model="tiny", prompt="stream me", max_tokens=6,
                                                        temperature=0, stream=True,
                                                        extra_body={"ignore_eos": True}):
                text += ch.choices[0].text
            chat = ""
            async for ch in await ac.chat.completions.create(model="tiny", messages=msgs, stream=True, **GREEDY):
                chat += ch.choices[0].delta.content or ""
            return done.choices[0].text, text, chat
        finally:
            await ac.close()
    done, text, chat = asyncio.run(go())
    assert done == text == ref and chat == ref_chat


def test_metrics_parse_and_count_the_traffic(server):
    def scrape():
        text = httpx.get(server.url + "/metrics").text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = s.name + ("" if not s.labels.get("finished_reason") else ":" + s.labels["finished_reason"])
                out[key] = s.value
        return out

    before = scrape()
    c = client(server)
    for i in range(3):
        c.completions.create(model="tiny", prompt=[256, 10 + i, 11], max_tokens=5, temperature=0,
                             extra_body={"ignore_eos": True})
    after = scrape()
    assert after["jaxdyn:prompt_tokens_total"] - before["jaxdyn:prompt_tokens_total"] == 9
    assert after["jaxdyn:generation_tokens_total"] - before["jaxdyn:generation_tokens_total"] == 15
    assert after["jaxdyn:request_success_total:length"] - before["jaxdyn:request_success_total:length"] == 3
    assert after["jaxdyn:time_to_first_token_seconds_count"] - before["jaxdyn:time_to_first_token_seconds_count"] == 3
    assert after["jaxdyn:e2e_request_latency_seconds_count"] - before["jaxdyn:e2e_request_latency_seconds_count"] == 3
    assert after["jaxdyn:compilations_after_warmup_total"] == 0
    # the engine loop's steps and its time in them, outside and inside the wait for the device
    steps = after["jaxdyn:engine_steps_total"] - before["jaxdyn:engine_steps_total"]
    assert steps >= 5                                   # 5 tokens each, one step per token at least
    host = after["jaxdyn:engine_host_seconds_total"] - before["jaxdyn:engine_host_seconds_total"]
    wait = after["jaxdyn:engine_device_wait_seconds_total"] - before["jaxdyn:engine_device_wait_seconds_total"]
    assert host > 0 and wait > 0
    call = after["jaxdyn:engine_step_call_seconds_total"] - before["jaxdyn:engine_step_call_seconds_total"]
    assert 0 < call < host                              # the compiled steps' calls: part of the host time
    assert after["jaxdyn:num_requests_running"] == 0 and "jaxdyn:kv_cache_usage_perc" in after


def test_tokenize_detokenize_and_no_double_bos(server):
    h = httpx.Client(base_url=server.url, timeout=30)
    r = h.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert r["tokens"][0] == 256 and r["tokens"].count(256) == 1      # the template's BOS only
    assert h.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "<s>user: hi\nassistant:"
    r = h.post("/tokenize", json={"prompt": "hé"}).json()
    assert r["tokens"] == [256, 104, 195, 169] and r["count"] == 4
    # Long texts are encoded on a thread pool (serving.app.ENCODE_INLINE_CHARS): the same ids.
    from serving import app as app_module
    long = "é" + "abc " * app_module.ENCODE_INLINE_CHARS
    r = h.post("/tokenize", json={"prompt": long}).json()
    assert r["tokens"] == [256, 195, 169] + list(b"abc " * app_module.ENCODE_INLINE_CHARS)
    assert app_module._ENCODE_POOL is not None
    r = h.post("/tokenize", json={"messages": [{"role": "user", "content": long}]}).json()
    assert r["count"] == len("<s>user: ".encode()) + len(long.encode()) + len("\nassistant:") - 2   # <s> is 1 id
    r = h.post("/v1/completions", json={"model": "tiny", "prompt": long, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert h.get("/version").json()["version"]
    assert h.get("/health").status_code == 200


def test_queue_bound_answers_503_with_retry_after(ckpt, server):
    core = server.state.core
    state = ServerState("tiny", max_queued_requests=0)
    state.engine = server.state.engine
    srv = Server(state)
    try:
        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as h:
                body = {"prompt": "q", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
                return await asyncio.gather(*[h.post("/v1/completions", json=body) for _ in range(24)])
        rs = asyncio.run(go())
        codes = [r.status_code for r in rs]
        assert codes.count(200) >= core.config.max_num_seqs and 503 in codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
        # a request of more sequences (prompts x n) than the bound could ever admit: 400, not a 503 to retry
        seqs = core.config.max_num_seqs + 1
        for extra in ({"prompt": ["q"] * seqs}, {"prompt": "q", "n": seqs}, {"prompt": ["q", "r"], "n": seqs // 2 + 1}):
            r = httpx.post(srv.url + "/v1/completions", json={"max_tokens": 2, **extra}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences", (extra, r.text)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "q", "max_tokens": 2,
                                                          "n": core.config.max_num_seqs}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"]) == core.config.max_num_seqs
    finally:
        srv.stop()


def test_health_is_503_while_loading():
    state = ServerState("later")
    srv = Server(state)
    try:
        assert httpx.get(srv.url + "/health").status_code == 503
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["message"] == "the model is still loading"
    finally:
        srv.stop()


def test_jaxdyn_serve_process_drains_on_sigterm(ckpt):
    """``jaxdyn serve --port 0`` names the port the system gave it; SIGTERM lets a stream in flight finish."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--model", ckpt, "--port", "0", "--dtype", "float32",
         "--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--num-pages", "32",
         "--log-level", "warning", "--shutdown-grace", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    lines, serving = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"serving '.*' at http://127\.0\.0\.1:\d+/v1", line):
                serving.set()
    threading.Thread(target=read, daemon=True).start()
    try:
        assert serving.wait(120), "".join(lines)
        port = int(re.search(r"at http://127\.0\.0\.1:(\d+)/v1", "".join(lines)).group(1))
        assert port != 0
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health").status_code == 200
        result = {}

        def stream():
            body = {"prompt": "drain", "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                result["events"] = r.read().decode().split("\n\n")

        # the engine process held (SIGSTOP) so that the stream is surely in flight when SIGTERM comes (unheld, the
        # tiny model's 60 tokens take ~0.05 s)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(c) for c in f.read().split()]
        engine = [c for c in children if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
        assert len(engine) == 1, children
        os.kill(engine[0], signal.SIGSTOP)
        try:
            t = threading.Thread(target=stream)
            t.start()
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert proc.poll() is None and t.is_alive()      # draining: the server waits for the stream
        finally:
            os.kill(engine[0], signal.SIGCONT)
        t.join(60)
        assert proc.wait(60) == 0
        assert result["events"][-2] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in result["events"][:-2] if e.startswith("data: {")]
        assert len("".join(c["choices"][0]["text"] for c in chunks).encode()) >= 1
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    time.sleep(0.2)                                  # the reader's last lines
    out = "".join(lines)
    assert f"serving '{os.path.basename(ckpt)}' at http://127.0.0.1:{port}/v1" in out     # named for its directory
    # load time and bytes are reported (qwen3 test checkpoint: float32 weights)
    m = re.search(r"loaded .* \(([\d.]+) MiB of weights\) in ([\d.]+) s, warm-up \(compiling every bucket[^)]*\) "
                  r"([\d.]+) s", out)
    assert m, out
    assert float(m.group(1)) > 0 and float(m.group(2)) >= 0 and float(m.group(3)) > 0


def test_streams_left_when_the_shutdown_grace_runs_out_end_with_an_error_event_not_cut_off(ckpt):
    """SIGTERM with a short --shutdown-grace (here: the server told to exit, as uvicorn's signal handler does):
    the streams still running shortly before the grace ends get an error event (503, server_shutting_down) and
    [DONE], and the engine aborts them, where uvicorn would cancel them mid-body (a truncated 200)."""
    from serving.cli import _DrainingServer
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, CFG)
    core.warmup()
    real_step = core.step

    def slow_step(*a, **k):                  # 20 steps a second: 100 tokens take 5 s
        time.sleep(0.05)
        return real_step(*a, **k)
    core.step = slow_step
    state = ServerState("tiny")
    state.engine = AsyncEngine(core)
    port = free_port()
    server = _DrainingServer(state, uvicorn.Config(build_app(state), host="127.0.0.1", port=port,
                                                   log_level="critical", timeout_graceful_shutdown=1.0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    results = []

    def stream(i):
        body = {"prompt": f"go {i}", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            results.append(r.read().decode())
    clients = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    try:
        for c in clients:
            c.start()
        time.sleep(1.0)
        server.should_exit = True
        for c in clients:
            c.join(30)
        thread.join(30)
        assert len(results) == 3 and not thread.is_alive()
        for raw in results:
            events = [e for e in raw.split("\n\n") if e]
            assert events[-1] == "data: [DONE]", raw[-300:]
            err = json.loads(events[-2][6:])["error"]
            assert err["code"] == "server_shutting_down" and "grace period" in err["message"]
        for _ in range(100):
            if not core.requests:
                break
            time.sleep(0.05)
        assert not core.requests and core.allocator.num_in_use == 0        # aborted in the engine too
    finally:
        server.should_exit = True
        state.engine.shutdown()


def test_an_engine_that_dies_mid_stream_sends_an_error_event_then_done_and_health_turns_503(ckpt):
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok,
                      EngineConfig(num_pages=32, page_size=16, max_num_batched_tokens=16, max_num_seqs=4,
                                   max_model_len=128, token_buckets=(16,), page_buckets=(8,), seed=0))
    real_step, calls = core.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("device lost (injected)")
        return real_step()
    core.step = failing_step
    state = ServerState("tiny")
    state.engine = AsyncEngine(core)
    srv = Server(state)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/ping").status_code == 200 and httpx.post(srv.url + "/ping").status_code == 200
        body = {"model": "tiny", "prompt": "x", "max_tokens": 50, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events = [e for e in r.read().decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert any("choices" in json.loads(e[6:]) for e in events[:-2])      # the stream had started
        err = json.loads(events[-2][6:])["error"]
        assert "engine died" in err["message"] and "device lost" in err["message"]
        assert httpx.get(srv.url + "/health").status_code == 503
        assert httpx.get(srv.url + "/ping").status_code == 503 and httpx.post(srv.url + "/ping").status_code == 503
        # its requests and pages went with it: the gauges read 0, not what they were when it died
        m = core.metrics
        assert (m.num_running, m.num_waiting, m.kv_pages_used, m.kv_pages_cached) == (0, 0, 0, 0)
        assert "jaxdyn:num_requests_running 0" in httpx.get(srv.url + "/metrics").text.replace(
            '{model_name="tiny"}', "")
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "y", "max_tokens": 2})
        assert r.status_code == 503 and "error" in r.json()
    finally:
        srv.stop()
        state.engine.shutdown()


@pytest.mark.parametrize("switch", [True, "plain_full"])
def test_a_server_with_the_sampler_switch_answers_what_the_default_answers(ckpt, server, switch):
    """``--sampler-switch`` (all variants, or plain's and full's: a GPU's default) through the HTTP API: greedy,
    seeded top-p / top-k / penalties with logprobs, and a plain seeded draw, concurrently, give the default
    (CPU: no switch) server's texts and logprobs; nothing compiles while serving and no KV page is left held."""
    import concurrent.futures
    import dataclasses

    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok,
                      dataclasses.replace(CFG, sampler_switch=switch))
    core.warmup()
    kinds = {k[0] if k[0] == "switch" else k[3] for k in core.runner._parts}
    assert kinds == ({"switch"} if switch is True else {"switch", "greedy", "random"})
    assert not server.state.engine.core.runner._switch
    state = ServerState("tiny", max_queued_requests=64, max_request_bytes=64 << 10)
    state.engine = AsyncEngine(core)
    srv = Server(state)
    asks = [dict(prompt="Hello", **GREEDY),
            dict(prompt="The sky", temperature=0.9, top_p=0.8, seed=7, max_tokens=8, logprobs=3,
                 extra_body={"ignore_eos": True}),
            dict(prompt="Once", temperature=1.0, seed=3, max_tokens=8, extra_body={"ignore_eos": True, "top_k": 5,
                                                                                  "repetition_penalty": 1.3}),
            dict(prompt="Numbers:", temperature=0.7, seed=11, max_tokens=8, extra_body={"ignore_eos": True})]
    try:
        def answers(s):
            c = client(s)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                outs = list(pool.map(lambda kw: c.completions.create(model="tiny", **kw), asks))
            return [(o.choices[0].text, None if o.choices[0].logprobs is None else o.choices[0].logprobs.token_logprobs)
                    for o in outs]

        got, want = answers(srv), answers(server)
        for (text, lps), (text1, lps1) in zip(got, want):
            assert text == text1
            assert (lps is None) == (lps1 is None)
            if lps is not None:
                np.testing.assert_allclose(lps, lps1, atol=1e-4)
        for _ in range(300):
            if not core.requests and core.allocator.num_in_use == 0:
                break
            time.sleep(0.02)
        assert core.allocator.num_in_use == 0 and core.metrics.compilations_after_warmup == 0
    finally:
        srv.stop()
        state.engine.shutdown()


def test_truncate_prompt_tokens_and_tokens_shown_as_ids(server):
    """vLLM's truncate_prompt_tokens (the prompt's last k tokens, or the first k with truncation_side "right";
    -1 the context) and return_tokens_as_token_ids ("token_id:<id>" in logprobs, text offsets of the text); both
    had been ignored, the request served as if they were absent."""
    with httpx.Client(base_url=server.url, timeout=60) as h:
        base = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
        full = h.post("/v1/completions", json={**base, "prompt": "abcdefgh"}).json()
        assert full["usage"]["prompt_tokens"] == 9                       # <s> + 8 bytes
        tail = h.post("/v1/completions", json={**base, "prompt": "abcdefgh", "truncate_prompt_tokens": 3,
                                               "echo": True}).json()
        same = h.post("/v1/completions", json={**base, "prompt": [ord(c) for c in "fgh"]}).json()
        assert tail["usage"]["prompt_tokens"] == 3
        assert tail["choices"][0]["text"] == "fgh" + same["choices"][0]["text"]
        head = h.post("/v1/completions", json={**base, "prompt": "abcdefgh", "truncate_prompt_tokens": 3,
                                               "truncation_side": "right", "echo": True}).json()
        assert head["usage"]["prompt_tokens"] == 3 and head["choices"][0]["text"].startswith("ab")   # <s>, a, b
        whole = h.post("/v1/completions", json={**base, "prompt": "abcdefgh", "truncate_prompt_tokens": -1}).json()
        assert whole["usage"]["prompt_tokens"] == 9 and whole["choices"][0]["text"] == full["choices"][0]["text"]
        chat = {"messages": [{"role": "user", "content": "hello there"}], **base}
        r = h.post("/v1/chat/completions", json={**chat, "truncate_prompt_tokens": 5}).json()
        assert r["usage"]["prompt_tokens"] == 5

        plain = h.post("/v1/completions", json={**base, "prompt": "hi", "logprobs": 2}).json()["choices"][0]
        as_ids = h.post("/v1/completions", json={**base, "prompt": "hi", "logprobs": 2,
                                                 "return_tokens_as_token_ids": True}).json()["choices"][0]
        shown = as_ids["logprobs"]["tokens"]
        assert len(shown) == 4 and all(re.fullmatch(r"token_id:\d+", t) for t in shown)
        for text, t in zip(plain["logprobs"]["tokens"], shown):         # byte tokens: an ASCII one is its code
            if text.isascii():
                assert t == f"token_id:{ord(text)}"
        assert as_ids["logprobs"]["text_offset"] == plain["logprobs"]["text_offset"]
        assert all(k.startswith("token_id:") for top in as_ids["logprobs"]["top_logprobs"] for k in top)
        c = h.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 2,
                                                 "return_tokens_as_token_ids": True}).json()["choices"][0]
        entry = c["logprobs"]["content"][0]
        assert entry["token"].startswith("token_id:") and entry["bytes"] == list(entry["token"].encode())
        assert all(t["token"].startswith("token_id:") for t in entry["top_logprobs"])


def test_the_models_generation_config_sets_what_a_request_leaves_out(server):
    """vLLM's --generation-config auto: the model's generation_config.json sets temperature, top_p, top_k, min_p
    and repetition_penalty where a request leaves them out, and its max_new_tokens caps max_tokens. Here top_k 1
    makes an unseeded sampled request the greedy one, unless the request sets its own top_k."""
    state = server.state
    with httpx.Client(base_url=server.url, timeout=60) as h:
        body = {"prompt": "abc", "max_tokens": 6, "ignore_eos": True}
        greedy = h.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
        state.sampling_defaults = {"top_k": 1, "max_tokens": 4}
        try:
            for seed in range(3):
                r = h.post("/v1/completions", json={**body, "seed": seed}).json()
                assert r["choices"][0]["text"] == greedy[:len(r["choices"][0]["text"])]
                assert r["usage"]["completion_tokens"] == 4                    # capped by max_new_tokens
            own = {h.post("/v1/completions", json={**body, "seed": s, "top_k": 0, "temperature": 2.0}).json()
                   ["choices"][0]["text"] for s in range(4)}
            assert len(own) > 1                                                # the request's own top_k stands
            chat = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "ignore_eos": True}).json()
            assert chat["usage"]["completion_tokens"] == 4                     # no max_tokens: the config's
        finally:
            state.sampling_defaults = {}


def test_generation_defaults_read_vllms_fields_and_name_a_bad_value(tmp_path):
    from jaxdyn.engine.sampling_params import generation_defaults
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05,
         "max_new_tokens": 512, "eos_token_id": [1, 2], "bos_token_id": 0}))
    assert generation_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                  "repetition_penalty": 1.05, "max_tokens": 512}
    assert generation_defaults("vllm") == {} and generation_defaults(None) == {}
    assert generation_defaults(str(tmp_path / "..")) == {}                   # a folder without one
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 7}))
    with pytest.raises(ValueError, match=r"generation_config.json: top_p: must be in \(0, 1\]"):
        generation_defaults(str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        generation_defaults(str(tmp_path / "nope"))


def test_chat_messages_reach_the_template_as_vllm_sends_them(server):
    """Text parts joined with newlines (vLLM's; they were joined with nothing), an assistant's tool_calls with their
    arguments parsed, a tool message's tool_call_id, the tools of a request whose tool_choice is "none", and
    /tokenize's chat_template_kwargs (they had been dropped, so the prompt was silently another)."""
    tok = server.state.core.tokenizer
    saved = tok.chat_template
    tok.chat_template = (
        "{% if tools %}TOOLS={% for t in tools %}{{ t['function']['name'] }};{% endfor %}{{ '\\n' }}{% endif %}"
        "{% if mode %}MODE={{ mode }}{{ '\\n' }}{% endif %}"
        "{% if documents %}DOCS={% for d in documents %}{{ d['title'] }};{% endfor %}{{ '\\n' }}{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}<call {{ c['function']['name'] }}"
        " city={{ c['function']['arguments']['city'] }}>{% endfor %}{% endif %}"
        "{% if m['tool_call_id'] %} [for {{ m['tool_call_id'] }}]{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as h:
            def ids(messages, **extra):
                r = h.post("/tokenize", json={"messages": messages, **extra})
                assert r.status_code == 200, r.text
                return r.json()["tokens"]

            def text(t):
                return h.post("/tokenize", json={"prompt": t, "add_special_tokens": False}).json()["tokens"]

            parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
            assert ids([{"role": "user", "content": parts}]) == text("user: hello\nworld\nassistant:")
            calls = [{"id": "c1", "type": "function",
                      "function": {"name": "weather", "arguments": json.dumps({"city": "Oslo"})}}]
            msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls},
                    {"role": "tool", "content": "cold", "tool_call_id": "c1"}]
            want = "user: hi\nassistant: <call weather city=Oslo>\ntool: cold [for c1]\nassistant:"
            assert ids(msgs) == text(want)
            tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
            assert ids(msgs, tools=tools) == text("TOOLS=weather;\n" + want)
            assert ids(msgs, chat_template_kwargs={"mode": "quiet"}) == text("MODE=quiet\n" + want)
            # the chat endpoint renders the same prompt: its usage counts it
            body = {"messages": msgs, "tools": tools, "tool_choice": "none", "max_tokens": 1}
            r = h.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(text("TOOLS=weather;\n" + want))
            # vLLM's documents reach the template; add_special_tokens puts the tokenizer's BOS before the template's
            # text (the template here writes none)
            docs = [{"title": "a", "text": "x"}, {"title": "b", "text": "y"}]
            for extra, want_ids in (({"documents": docs}, text("DOCS=a;b;\n" + want)),
                                    ({"add_special_tokens": True}, h.post("/tokenize", json={"prompt": want}).json()[
                                        "tokens"]),
                                    ({"chat_template_kwargs": {"documents": docs[:1]}, "documents": docs},
                                     text("DOCS=a;\n" + want))):
                r = h.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1, **extra})
                assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want_ids), (extra, r.text)
            assert len(h.post("/tokenize", json={"prompt": want}).json()["tokens"]) == len(text(want)) + 1
            # /tokenize's messages take the same (vLLM's: no special tokens unless asked); a null chat_template
            # among the kwargs asks for nothing
            assert ids(msgs, documents=docs) == text("DOCS=a;b;\n" + want)
            assert ids(msgs, add_special_tokens=True) == h.post("/tokenize", json={"prompt": want}).json()["tokens"]
            assert ids(msgs, chat_template_kwargs={"chat_template": None}) == text(want)
            bad = [{"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": "{city"}}]}]
            r = h.post("/v1/chat/completions", json={"messages": bad, "max_tokens": 1})
            assert r.status_code == 400 and "arguments is not JSON" in r.json()["error"]["message"]
            r = h.post("/v1/chat/completions", json={"messages": msgs, "tools": "weather", "tool_choice": "none",
                                                     "max_tokens": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
            # vLLM merges chat_template_kwargs over the request's own arguments, tools among them
            assert ids(msgs, chat_template_kwargs={"tools": tools}) == text("TOOLS=weather;\n" + want)
            # an empty final message to continue, with tools: the assistant's turn starts (it was a 400)
            cont = msgs[:1] + [{"role": "assistant", "content": ""}]
            assert ids(cont, tools=tools, continue_final_message=True, add_generation_prompt=False) == \
                text("TOOLS=weather;\nuser: hi\nassistant:")
            deep = [{"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "[" * 20000 + "]" * 20000}}]}]
            image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
            for bad_msgs in (deep, image):
                for path, payload in (("/v1/chat/completions", {"messages": bad_msgs, "max_tokens": 1}),
                                      ("/tokenize", {"messages": bad_msgs})):
                    r = h.post(path, json=payload)
                    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", (path, r.text)
    finally:
        tok.chat_template = saved


def test_a_client_gone_while_sending_its_body_is_no_internal_error(server, caplog):
    # the body is announced at 100 bytes and the connection closed after 15: a client disconnect, not a bug
    host, port = server.url.removeprefix("http://").split(":")
    with caplog.at_level("ERROR", logger="serving.app"):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": \"hi\"")
            time.sleep(0.3)
        time.sleep(0.5)
        assert httpx.get(server.url + "/health").status_code == 200
    assert "internal error" not in caplog.text


def test_allowed_token_ids_over_http(server):
    # vLLM's extra field, in completions and chat, streamed or not: every token one of the allowed
    for path, body in (("/v1/completions", {"prompt": "hello"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]})):
        for stream in (False, True):
            r = httpx.post(server.url + path, json={**body, "model": "tiny", "max_tokens": 6, "temperature": 1.0,
                                                    "seed": 5, "ignore_eos": True, "allowed_token_ids": [65, 66],
                                                    "stream": stream}, timeout=60)
            assert r.status_code == 200, r.text
            if stream:
                chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                          if line.startswith("data: {")]
                text = "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
                               for c in chunks if c["choices"])
            else:
                choice = r.json()["choices"][0]
                text = choice["text"] if "text" in choice else choice["message"]["content"]
            assert len(text) == 6 and set(text) <= {"A", "B"}, (path, stream, text)


def test_logit_bias_over_http(server):
    # OpenAI's form (ids as strings), clamped to +-100 as vLLM's server does: every token is the favoured one
    for path, body in (("/v1/completions", {"prompt": "hello"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]})):
        r = httpx.post(server.url + path, json={**body, "model": "tiny", "max_tokens": 3, "temperature": 0,
                                                "ignore_eos": True, "logit_bias": {"65": 10**400}}, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert text == "AAA", text


def test_prompt_logprobs_and_echo_with_logprobs_over_http(server, ckpt):
    """Completions' ``echo`` with ``logprobs`` (lm-eval's loglikelihood request): the choice's logprobs start with
    the prompt's tokens, the first with null logprob and top logprobs, the others transformers' log-softmax of
    the position before; streamed, the first chunk carries them. vLLM's ``prompt_logprobs``: per prompt token
    {id: {logprob, rank, decoded_token}} in completions' choices and beside chat's choices."""
    import torch
    from tests.support import hf_model
    text = "the quick brown fox"
    ids = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()["tokens"]
    with torch.no_grad():
        want = torch.log_softmax(hf_model(ckpt)(torch.tensor([ids])).logits[0].double(), -1).numpy()
    body = {"model": "tiny", "prompt": text, "max_tokens": 1, "temperature": 0, "ignore_eos": True, "echo": True,
            "logprobs": 1}
    with httpx.Client(base_url=server.url, timeout=60) as h:
        r = h.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1 and choice["text"].startswith(text)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for i in range(1, len(ids)):
            assert abs(lp["token_logprobs"][i] - want[i - 1, ids[i]]) < 1e-4, i
            assert 1 <= len(lp["top_logprobs"][i]) <= 2
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
        assert abs(lp["token_logprobs"][-1] - want[-1].max()) < 1e-4      # greedy: the last position's top token
        events = [json.loads(line[6:]) for line in h.post("/v1/completions", json={**body, "stream": True,
                  "max_tokens": 3}).text.splitlines() if line.startswith("data: {")]
        first = events[0]["choices"][0]["logprobs"]
        assert first["token_logprobs"][:len(ids)] == lp["token_logprobs"][:len(ids)]
        later = [e["choices"][0]["logprobs"] for e in events[1:] if e["choices"] and e["choices"][0]["logprobs"]]
        # the 3 tokens drawn, each with its logprob, in the first chunk or later ones (a loaded host's stream may
        # coalesce them all into the first)
        drawn = first["token_logprobs"][len(ids):] + [t for x in later for t in x["token_logprobs"]]
        assert len(drawn) == 3 and all(t is not None for t in drawn), drawn

        # max_tokens 0 with echo (vLLM's echo without generation): the prompt alone, its logprobs, no tokens used
        for stream in (False, True):
            r = h.post("/v1/completions", json={**body, "max_tokens": 0, "stream": stream,
                                                "stream_options": {"include_usage": True} if stream else None})
            assert r.status_code == 200, r.text
            if stream:
                events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
                (choice,) = [e["choices"][0] for e in events if e["choices"]]
                usage = events[-1]["usage"]
            else:
                choice, usage = r.json()["choices"][0], r.json()["usage"]
            assert choice["text"] == text and choice["finish_reason"] == "length"
            assert choice["logprobs"]["token_logprobs"] == lp["token_logprobs"][:len(ids)]
            assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] == len(ids)
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 2, "temperature": 0,
                                            "prompt_logprobs": 2, "n": 2})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            plp = choice["prompt_logprobs"]
            assert plp[0] is None and len(plp) == len(ids) and choice["logprobs"] is None
            for i in range(1, len(ids)):
                entry = plp[i]
                assert str(ids[i]) in entry and 2 <= len(entry) <= 3
                for tid, v in entry.items():
                    assert abs(v["logprob"] - want[i - 1, int(tid)]) < 1e-4 and isinstance(v["decoded_token"], str)
                ranked = sorted((v["rank"], int(t)) for t, v in entry.items() if v["rank"] is not None)
                assert [t for _, t in ranked][:2] == list(np.argsort(-want[i - 1], kind="stable")[:2])
        r = h.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2, "temperature": 0, "prompt_logprobs": 0})
        assert r.status_code == 200, r.text
        plp = r.json()["prompt_logprobs"]
        assert plp[0] is None and all(len(e) == 1 for e in plp[1:]) and len(plp) == r.json()["usage"]["prompt_tokens"]


def test_cache_salt_over_http(server):
    """A repeated prompt is a prefix-cache hit only under the same ``cache_salt`` (vLLM's field, completions and
    chat): usage's cached tokens say so."""
    prompt = "a prompt long enough to fill whole pages of the prefix cache, and then some"
    with httpx.Client(base_url=server.url, timeout=60) as h:
        def cached(**extra):
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2,
                                                "temperature": 0, **extra})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached(cache_salt="s1") == 0
        assert cached(cache_salt="s2") == 0
        assert cached(cache_salt="s1") >= 64 and cached(cache_salt="s2") >= 64

        def chat_cached(**extra):
            r = h.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                                                     "max_tokens": 2, **extra})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert chat_cached(cache_salt="s3") == 0
        assert chat_cached(cache_salt="s3") >= 64          # the same salt: a hit
        assert chat_cached(cache_salt="s4") == 0 and chat_cached() == 0     # another salt, or none: a miss


def test_every_served_name_is_listed_accepted_and_echoed(server):
    # vLLM's several --served-model-name: /v1/models lists each, a request may give any, and a response carries
    # the name the request gave (the first one where it gives none); another name is a 404 naming them all
    state = ServerState("tiny", aliases=("/models/tiny", "tiny"), model_root="/models/tiny")
    state.engine = server.state.engine
    assert state.model_names == ("tiny", "/models/tiny")
    assert ServerState("a").model_root == "a"                  # no path given: the name
    srv = Server(state)
    try:
        listed = httpx.get(srv.url + "/v1/models").json()["data"]
        # each name's root is the model's path, as vLLM's
        assert [m["id"] for m in listed] == ["tiny", "/models/tiny"] and {m["root"] for m in listed} == {"/models/tiny"}
        body = {"prompt": "x", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
        for given, answered in (("/models/tiny", "/models/tiny"), ("tiny", "tiny"), (None, "tiny")):
            r = httpx.post(srv.url + "/v1/completions", json=dict(body, **({"model": given} if given else {})))
            assert r.status_code == 200 and r.json()["model"] == answered, r.text
        chat = {"model": "/models/tiny", "messages": [{"role": "user", "content": "yo"}], "max_tokens": 2,
                "temperature": 0, "ignore_eos": True}
        assert httpx.post(srv.url + "/v1/chat/completions", json=chat).json()["model"] == "/models/tiny"
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=dict(chat, stream=True)) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert chunks and {c["model"] for c in chunks} == {"/models/tiny"}
        with httpx.stream("POST", srv.url + "/v1/completions",
                          json=dict(body, model="/models/tiny", stream=True)) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert chunks and {c["model"] for c in chunks} == {"/models/tiny"}
        r = httpx.post(srv.url + "/v1/completions", json=dict(body, model="gpt-5"))
        assert r.status_code == 404
        assert "this server serves 'tiny' or '/models/tiny'" in r.json()["error"]["message"]
    finally:
        srv.stop()
