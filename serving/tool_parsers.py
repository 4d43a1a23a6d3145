"""Tool calls read out of a chat completion's text, as vLLM's ``--tool-call-parser`` does (with
``--enable-auto-tool-choice``: ``tool_choice`` "auto").

The model writes its calls in its own syntax; the parser named for the served model turns them into OpenAI's
``tool_calls`` (each a function name and its arguments as a JSON string) and what came before them into the
message's content:

- ``hermes`` (Hermes 2 Pro, Qwen 2.5 / 3 and the templates that follow them): each call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; text before the first call is content (a final
  call the model did not close is read to the end of the text).
- ``llama3_json`` (Llama 3.1 / 3.2's JSON tool calling): the whole reply is one call, or several separated by
  ``;``, each ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``), optionally after ``<|python_tag|>``.
- ``mistral``: after ``[TOOL_CALLS]``, a JSON list of ``{"name": ..., "arguments": {...}}`` (tokenizers before
  v11) or ``name[ARGS]{...}``, one a ``[TOOL_CALLS]`` (v11 on); each call's id nine letters and digits, as Mistral's
  chat templates require of the ids they are given back.

A reply that does not parse (malformed JSON, a call without a name) is content, whole, as vLLM returns it.

Streamed, ``ToolCallStream`` passes content through as it comes, holds back what could begin a call, and gives the
calls once the reply has ended (one delta per call, its arguments whole): what OpenAI clients accumulate either way.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import random
import re
import string
import uuid

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")


# what a reply that is not the JSON of a call raises: json.JSONDecodeError (a ValueError), ``_call``'s ValueError,
# and RecursionError for one nested past the parser's depth
_JSON_ERRORS = (ValueError, RecursionError)


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str            # a JSON object, as a string (OpenAI's)
    id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    def to_json(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return d if index is None else {"index": index, **d}


def _call(obj, args_keys: tuple[str, ...], make=ToolCall) -> ToolCall:
    """A call from a decoded JSON object (ValueError where it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError("a tool call needs a name")
    # the first of the keys given a value; absent or null: a call without arguments (as an earlier turn's are read)
    args = next((obj[k] for k in args_keys if obj.get(k) is not None), {})
    if isinstance(args, str):         # arguments already a JSON string: it must hold an object
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError("a tool call's arguments must be an object")
    # strict JSON for the client (NaN / Infinity are not: allow_nan=False raises) and Unicode text (a model's
    # "\ud83d" escape decodes to an unpaired surrogate, which the response's UTF-8 cannot hold: a 500, or a stream
    # cut off); either ValueError (UnicodeEncodeError is one) makes the reply content, as any call that does not parse
    arguments = json.dumps(args, ensure_ascii=False, allow_nan=False)
    arguments.encode("utf-8")
    obj["name"].encode("utf-8")       # (the name's escapes likewise)
    return make(obj["name"], arguments)


def _mistral_call(name: str, arguments: str) -> ToolCall:
    """A call whose id is nine letters and digits (Mistral's templates refuse others when the call comes back)."""
    alphabet = string.ascii_letters + string.digits
    return ToolCall(name, arguments, "".join(random.SystemRandom().choice(alphabet) for _ in range(9)))


class ToolParser(abc.ABC):
    """A model family's tool-call syntax."""

    name = ""
    markers: tuple[str, ...] = ()     # the syntax's tags: a model whose tokenizer makes them special tokens has its
                                      # replies decoded with them (vLLM's adjust_request: skip_special_tokens off)

    def needs_special_tokens(self, tokenizer) -> bool:
        """Whether a reply must keep special tokens in its text for its calls to be read (a tag is one)."""
        is_special = getattr(tokenizer, "is_special", None)
        return is_special is not None and any(is_special(m) for m in self.markers)

    @abc.abstractmethod
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(the content, None if there is none, and the calls) of a whole reply; no calls: (text, [])."""

    @abc.abstractmethod
    def call_start(self, text: str) -> int | None:
        """Where the calls start in ``text`` (the reply's text not sent yet: from its start until some is sent);
        None: not known yet; -1: the reply holds none where this syntax would put them."""

    @abc.abstractmethod
    def may_start(self, text: str) -> int:
        """How many characters at the end of ``text`` could be the beginning of a call: held back when streamed."""


class _MarkedCalls(ToolParser):
    """A syntax whose calls begin at a marker (``START``) anywhere in the reply."""

    START = ""

    def call_start(self, text):
        at = text.find(self.START)
        return None if at < 0 else at

    def may_start(self, text):
        for n in range(min(len(self.START) - 1, len(text)), 0, -1):
            if self.START.startswith(text[-n:]):
                return n
        return 0


class HermesParser(_MarkedCalls):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    markers = (START, END)
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)

    def parse(self, text):
        at = text.find(self.START)
        if at < 0:
            return text, []
        try:
            calls = [_call(json.loads(closed or open_), ("arguments",))
                     for closed, open_ in self._CALL.findall(text[at:])]
        except _JSON_ERRORS:
            return text, []
        if not calls:
            return text, []
        return (text[:at] or None), calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"
    markers = (TAG,)

    def parse(self, text):
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].lstrip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, pos = json.JSONDecoder(), [], 0
        try:
            while pos < len(body):
                obj, end = decoder.raw_decode(body, pos)
                calls.append(_call(obj, ("parameters", "arguments")))
                pos = end
                while pos < len(body) and body[pos] in " \t\r\n;":
                    pos += 1
        except _JSON_ERRORS:
            return text, []
        return None, calls

    def call_start(self, text):
        body = text.lstrip()
        if not body:
            return None
        if body.startswith("{") or body.startswith(self.TAG):
            return 0
        if self.TAG.startswith(body):
            return None               # could still be the tag
        return -1                     # content: no call at the start

    def may_start(self, text):
        return len(text) if self.call_start(text) is None else 0


class MistralParser(_MarkedCalls):
    name = "mistral"
    START, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
    markers = (START, ARGS, CALL_ID)

    def parse(self, text):
        at = text.find(self.START)
        if at < 0:
            return text, []
        calls = []
        try:
            for seg in text[at + len(self.START):].split(self.START):
                seg = seg.strip()
                if seg[:1] in ("[", "{"):          # a JSON list of calls (or one call)
                    objs = json.loads(seg)
                    for obj in objs if isinstance(objs, list) else [objs]:
                        calls.append(_call(obj, ("arguments", "parameters"), _mistral_call))
                else:                              # name[ARGS]{...}, or name[CALL_ID]id[ARGS]{...} (v11+ templates)
                    name, sep, args = seg.partition(self.ARGS)
                    if not sep:
                        raise ValueError("a call without [ARGS]")
                    name, marked, call_id = name.partition(self.CALL_ID)
                    call_id = call_id.strip()
                    make = functools.partial(ToolCall, id=call_id) if marked and call_id.isalnum() else _mistral_call
                    calls.append(_call({"name": name.strip(), "arguments": json.loads(args)}, ("arguments",), make))
        except _JSON_ERRORS:
            return text, []
        if not calls:
            return text, []
        return (text[:at] or None), calls


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}


def make_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"--tool-call-parser: expected one of {', '.join(TOOL_CALL_PARSERS)}, got {name!r}")
    return PARSERS[name]()


class ToolCallStream:
    """One streamed choice: ``feed(delta)`` returns the content to send now; ``finish()`` the content held back
    and the calls, once the reply has ended. A delta costs its own length (the reply is kept in pieces; only the
    text not yet sent, at most a call marker's length, is searched again)."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self._pieces: list[str] = []  # the whole reply so far
        self.pending = ""             # its text not sent yet (held back, or from where the calls start)
        self.calls_at: int | None = None   # where the calls start in the reply (None: none found yet)
        self.sent = 0                 # characters of the reply sent as content
        self.content_only = False     # the syntax puts calls where this reply has none (llama3_json: at its start)

    @property
    def text(self) -> str:
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def feed(self, delta: str) -> str:
        self._pieces.append(delta)
        if self.calls_at is not None:
            return ""
        pending = self.pending + delta
        if self.content_only:
            out = pending
        else:
            # the unsent text is the reply's from its start until something is sent (llama3_json decides there)
            at = self.parser.call_start(pending)
            if at is not None and at >= 0:
                self.calls_at = self.sent + at
                out = pending[:at]
            elif at == -1:            # llama3_json: the reply is content
                self.content_only = True
                out = pending
            else:
                out = pending[:len(pending) - self.parser.may_start(pending)]
        self.pending = pending[len(out):]
        self.sent += len(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, the calls): the calls' text parsed, or sent as content where it does not parse."""
        if self.calls_at is None:
            rest, self.pending = self.pending, ""
        else:
            _, calls = self.parser.parse(self.text)
            if calls:
                return "", calls
            rest = self.text[self.sent:]          # the calls' text did not parse: it is content
        self.sent += len(rest)
        return rest, []
