"""Tool calls read out of chat replies (vLLM's --enable-auto-tool-choice / --tool-call-parser): the parsers on
text, streamed in any chunking, and the chat endpoint over an engine whose replies are scripted."""

import asyncio
import json
import types

import httpx
import numpy as np
import openai
import pytest

from jaxdyn.engine.async_engine import StreamingEngine, _post
from jaxdyn.engine.core import check_request
from jaxdyn.engine.request import CompletionOutput, RequestOutput
from jaxdyn.engine.tokenizer import Tokenizer
from serving.app import ServerState
from serving.cli import main
from serving.tool_parsers import ToolCallStream, make_parser
from tests.serving.test_server import TEMPLATE, Server, free_port
from tests.support import make_byte_tokenizer

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
TIME = '{"name": "get_time", "arguments": {}}'
HERMES = [  # (reply, content, [(name, arguments)])
    ("no call here", "no call here", []),
    (f"<tool_call>{WEATHER}</tool_call>", None, [("get_weather", {"city": "Paris", "unit": "C"})]),
    (f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{TIME}</tool_call>", "Let me look.\n",
     [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {})]),
    (f"<tool_call>{TIME[:-1]}, \"x\": 1}}", None, [("get_time", {})]),            # not closed: read to the end
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>', None, [("f", {"a": 2})]),
    ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),   # no name
    ('<tool_call>{"name": "f", "arguments": null}</tool_call>', None, [("f", {})]),    # null: no arguments
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     []),                                                                             # not an object: content
    ("a < b <tool but no call", "a < b <tool but no call", []),
]
LLAMA = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": [1]}}', None,
     [("a", {}), ("b", {"x": [1]})]),
    ("  The weather is fine.", "  The weather is fine.", []),
    ('{"name": "a", "parameters": {}', '{"name": "a", "parameters": {}', []),          # cut short: content
    ('{"name": "a", "parameters": null, "arguments": {"x": 1}}', None, [("a", {"x": 1})]),  # the key with a value
    ("{not a call}", "{not a call}", []),
]
MISTRAL = [
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
     None, [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ('Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', "Sure. ",
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("[TOOL_CALLS]get_weather{}", "[TOOL_CALLS]get_weather{}", []),                  # no [ARGS]: content
    # v11+ templates: the call's id written by the model (kept: its template takes it back)
    ('[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris"}', None, [("get_weather", {"city": "Paris"})]),
    ("[TOOLS are fine]", "[TOOLS are fine]", []),
]


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def _stays_content(name, reply):
    """``reply`` parsed whole and streamed by parser ``name``: all of it content, no calls."""
    assert make_parser(name).parse(reply) == (reply, [])
    s = ToolCallStream(make_parser(name))
    sent = s.feed(reply)
    rest, calls = s.finish()
    assert (sent + rest, calls) == (reply, [])


CASES = [("hermes", HERMES), ("llama3_json", LLAMA), ("mistral", MISTRAL)]


@pytest.mark.parametrize("name, cases", CASES)
def test_a_reply_parses_into_content_and_calls(name, cases):
    parser = make_parser(name)
    for reply, content, calls in cases:
        got_content, got_calls = parser.parse(reply)
        assert (got_content, _calls(got_calls)) == (content, calls), reply
        if name == "mistral":         # the ids Mistral's templates take back: nine letters and digits
            assert all(len(c.id) == 9 and c.id.isalnum() for c in got_calls)
            if "[CALL_ID]" in reply:
                assert [c.id for c in got_calls] == ["a1B2c3D4e"]
        else:
            assert all(c.id.startswith("chatcmpl-tool-") for c in got_calls)
        assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("name, cases", CASES)
def test_streamed_in_any_chunks_the_content_and_calls_are_the_whole_replys(name, cases):
    """Content passes as it comes (what could begin a call held back), calls at the end: for every reply, cut
    into chunks at random and one character at a time, the content sent is what was not a call, and no part of a
    call's text is ever sent as content."""
    rng = np.random.default_rng(0)
    parser = make_parser(name)
    for reply, content, calls in cases:
        for cuts in [list(range(1, len(reply)))] + [sorted(rng.choice(np.arange(1, len(reply)), 3, replace=False))
                                                     for _ in range(20)]:
            pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)])]
            s = ToolCallStream(parser)
            sent = "".join(s.feed(p) for p in pieces)
            rest, got = s.finish()
            assert _calls(got) == calls, (reply, pieces)
            assert sent + rest == (reply if not calls else (content or "")), (reply, pieces)
            if calls and content is None:
                assert sent.strip() == "", (reply, pieces)


@pytest.mark.parametrize("name, reply", [
    ("hermes", '<tool_call>{"name": "f", "arguments": ' + "[" * 3000 + "]" * 3000 + "}</tool_call>"),
    ("hermes", '<tool_call>{"name": "f", "arguments": "' + "[" * 3000 + '"}</tool_call>'),
    ("llama3_json", '{"name": "f", "parameters": ' + "{\"a\": " * 3000 + "1" + "}" * 3000 + "}"),
    ("mistral", "[TOOL_CALLS]" + "[" * 3000 + "]" * 3000),
    ("mistral", "[TOOL_CALLS]f[ARGS]" + "[" * 3000 + "]" * 3000),
])
def test_a_reply_nested_past_the_json_parsers_depth_stays_text(name, reply):
    """A model's reply nested deeper than the JSON parser goes (a RecursionError, not a ValueError) is content
    with no calls, as malformed JSON is, not an exception out of the reply's end."""
    _stays_content(name, reply)


@pytest.mark.parametrize("name, reply", [
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": "\\ud83d"}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f\\udc00", "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>'),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1e999}}'),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"x": "\\udfff"}'),
])
def test_arguments_that_are_not_unicode_or_strict_json_leave_the_reply_as_content(name, reply):
    """A model's JSON escaping an unpaired surrogate (its arguments or name: text the response's UTF-8 cannot hold,
    a 500 or a stream cut off) or holding NaN / Infinity (not JSON to a strict client) makes no call: the reply is
    content, as any call that does not parse; an escaped pair (an emoji) is a call."""
    _stays_content(name, reply)
    emoji = '<tool_call>{"name": "f", "arguments": {"x": "\\ud83d\\ude00"}}</tool_call>'
    assert _calls(make_parser("hermes").parse(emoji)[1]) == [("f", {"x": "\U0001F600"})]


def test_an_unknown_parser_is_named():
    with pytest.raises(ValueError, match="--tool-call-parser: expected one of hermes, llama3_json, mistral"):
        make_parser("pythonic")


# ---- the chat endpoint over scripted replies -------------------------------------------------------


class ScriptedEngine(StreamingEngine):
    """Replies with ``reply`` (each choice), a few bytes a step: the server's side of the engine, without a model."""

    def __init__(self, tokenizer):
        super().__init__(None)
        self.reply = ""
        self.core = types.SimpleNamespace(
            tokenizer=tokenizer, config=types.SimpleNamespace(max_num_seqs=8), max_model_len=512, num_pages=64,
            model_config=types.SimpleNamespace(vocab_size=258), eos_token_ids=(257,), metrics=None)
        self.core.config.page_size = 16
        self.core.check_request = lambda ids, params: check_request(self.core, ids, params)
        self.is_healthy = True

    def _send(self, cmd):
        if cmd[0] != "add":
            return
        _, rid, prompt, params = cmd[:4]
        self.params = params
        tok = self.core.tokenizer
        ids = tok.encode(self.reply, add_special_tokens=False)
        loop = asyncio.get_running_loop()

        async def play():
            for k in range(0, len(ids), 3):
                await asyncio.sleep(0.001)
                done = k + 3 >= len(ids)
                text = tok.decode(ids[:k + 3], skip_special_tokens=params.skip_special_tokens)
                delta = text[len(tok.decode(ids[:k], skip_special_tokens=params.skip_special_tokens)):]
                outs = [CompletionOutput(i, text, ids[:k + 3], delta, ids[k:k + 3], None, None, None,
                                         "stop" if done else None)
                        for i in range(params.n)]
                pending = {}
                self._deliver(RequestOutput(rid, prompt, outs, done), rid, pending)
                _post(pending)
        loop.create_task(play())


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    make_byte_tokenizer(path, chat_template=TEMPLATE)
    state = ServerState("tiny", tool_call_parser="hermes")
    state.engine = ScriptedEngine(Tokenizer.from_pretrained(path))
    server = Server(state)
    yield server.url, state
    server.stop()


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def test_chat_returns_the_calls_as_openai_tool_calls_streamed_or_not(tool_server):
    url, state = tool_server
    state.engine.reply = f"Checking.<tool_call>{WEATHER}</tool_call>"
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, n=2)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
        assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    content, calls, reasons = {}, {}, {}
    empty = 0
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="auto",
                                                stream=True, n=2):
        for ch in chunk.choices:
            # nothing sent while a call's text is held back (an empty content chunk a step, before)
            empty += (ch.delta.content == "" and not ch.delta.role and not ch.delta.tool_calls and not ch.finish_reason)
            content[ch.index] = content.get(ch.index, "") + (ch.delta.content or "")
            for tc in ch.delta.tool_calls or ():
                calls.setdefault(ch.index, []).append((tc.index, tc.function.name, json.loads(tc.function.arguments)))
            reasons[ch.index] = ch.finish_reason or reasons.get(ch.index)
    assert content == {0: "Checking.", 1: "Checking."} and reasons == {0: "tool_calls", 1: "tool_calls"}
    assert calls[0] == calls[1] == [(0, "get_weather", {"city": "Paris", "unit": "C"})]
    assert empty == 0
    state.engine.reply = "It is sunny."                    # no call: an ordinary reply
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS)
    assert r.choices[0].message.content == "It is sunny." and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    state.engine.reply = f"<tool_call>{WEATHER}</tool_call>"
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content == state.engine.reply and not r.choices[0].message.tool_calls


def test_tags_that_are_special_tokens_are_kept_for_the_parser(tool_server, tmp_path):
    """A tokenizer whose <tool_call> and </tool_call> are special tokens (some Hermes models'): a request with
    tools is decoded with special tokens kept (vLLM's hermes parser does the same), so its calls are read; without
    tools the request's own skip_special_tokens stands."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RawTokenizer
    url, state = tool_server
    make_byte_tokenizer(str(tmp_path), chat_template=TEMPLATE)
    raw = RawTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    raw.add_special_tokens([AddedToken("<tool_call>", special=True), AddedToken("</tool_call>", special=True)])
    raw.save(str(tmp_path / "tokenizer.json"))
    plain, state.engine.core.tokenizer = state.engine.core.tokenizer, Tokenizer.from_pretrained(str(tmp_path))
    try:
        assert make_parser("hermes").needs_special_tokens(state.engine.core.tokenizer)
        assert not make_parser("hermes").needs_special_tokens(plain)
        state.engine.reply = f"<tool_call>{WEATHER}</tool_call>"
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS)
        assert state.engine.params.skip_special_tokens is False
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls[0].function.name == \
            "get_weather"
        r = client.chat.completions.create(model="tiny", messages=MESSAGES)
        assert state.engine.params.skip_special_tokens is True and r.choices[0].message.content == WEATHER
    finally:
        state.engine.core.tokenizer = plain


def test_forced_calls_and_tool_choice_without_tools_are_refused_by_name(tool_server):
    url, state = tool_server
    for body, message in (({"tools": TOOLS, "tool_choice": "required"}, "needs guided decoding"),
                          ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                           "needs guided decoding"),
                          ({"tool_choice": "auto"}, "needs tools")):
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
        assert message in r.json()["error"]["message"]


def test_serve_needs_a_parser_for_auto_tool_choice(capsys):
    assert main(["serve", "--enable-auto-tool-choice", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "--enable-auto-tool-choice needs --tool-call-parser" in err and err.count("\n") == 1


def test_tool_definitions_and_tool_choice_are_checked_as_vllm_reads_them():
    """A tool is {"type": "function", "function": {"name": ..., "description"?, "parameters"?}}, its type "function"
    when left out (vLLM's default, filled in for the template); tool_choice one of "none", "auto", "required" or a
    named function (its type may be left out too). Anything else is a 400 naming the field."""
    from serving.app import APIError, _validate
    from serving.protocol import ChatCompletionRequest
    msgs = [{"role": "user", "content": "hi"}]
    r = _validate(ChatCompletionRequest, {"messages": msgs, "tools": [{"function": {"name": "f", "strict": True}}],
                                          "tool_choice": {"function": {"name": "f"}}})
    assert r.tools == [{"type": "function", "function": {"name": "f", "strict": True}}]
    for bad, param in (({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools"),
                       ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools"),
                       ({"tool_choice": "any"}, "tool_choice"),
                       ({"tool_choice": {"type": "function", "function": {}}}, "tool_choice")):
        with pytest.raises(APIError) as e:
            _validate(ChatCompletionRequest, {"messages": msgs, **bad})
        assert e.value.status == 400 and e.value.param == param, bad


def test_parallel_tool_calls_false_returns_the_first_call_only(tool_server):
    """OpenAI's ``parallel_tool_calls: false`` (at most one call; vLLM keeps the first): it was accepted and
    ignored, both calls returned."""
    url, state = tool_server
    other = json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})
    state.engine.reply = f"<tool_call>{WEATHER}</tool_call><tool_call>{other}</tool_call>"
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    cities = lambda calls: [json.loads(c.function.arguments)["city"] for c in calls]     # noqa: E731
    for parallel, want in ((None, ["Paris", "Oslo"]), (True, ["Paris", "Oslo"]), (False, ["Paris"])):
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, **extra)
        assert cities(r.choices[0].message.tool_calls) == want and r.choices[0].finish_reason == "tool_calls"
        streamed = [tc for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                                                    stream=True, **extra)
                    for ch in chunk.choices for tc in ch.delta.tool_calls or ()]
        assert cities(streamed) == want and [tc.index for tc in streamed] == list(range(len(want)))
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "tools": TOOLS,
                                                      "parallel_tool_calls": "no"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "parallel_tool_calls"
