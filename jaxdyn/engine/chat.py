"""Chat templates rendered with jinja2 the way transformers renders them, and a chat's prompt text as vLLM builds it
(``chat_prompt``: the server's /v1/chat/completions and ``LLM.chat``)."""

from __future__ import annotations

import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat that cannot be rendered; ``param``: the request field to blame (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


def _raise_exception(message):
    raise ChatTemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    import json
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, **kwargs) -> str:
    """The prompt text. Tokenize it without adding special tokens: the template writes BOS itself."""
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token or "", eos_token=eos_token or "", **kwargs)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except RecursionError:      # e.g. tojson of a tool's schema nested past Python's stack
        raise ChatTemplateError("chat template failed: a value is nested too deep to render") from None
    except OverflowError as e:  # the sandbox's range limit, or a number too large for a filter
        raise ChatTemplateError(f"chat template failed: {e}") from None


def message_text(content) -> str:
    """OpenAI content: a string, or a list of parts of which only text parts are supported, joined with newlines
    (vLLM's ``_parse_chat_message_content_parts``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for i, part in enumerate(content):
        if part.get("type") != "text":
            raise ChatTemplateError(f"content part of type {part.get('type')!r} is not supported; only text")
        if not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"content[{i}]: a text part's text must be a string, got "
                                    f"{repr(part.get('text'))[:40]}")
        out.append(part["text"])
    return "\n".join(out)


TEMPLATE_ARGS = ("messages", "add_generation_prompt", "bos_token", "eos_token")


def template_message(m: dict) -> dict:
    """A message (OpenAI's fields, as a dict) as the template sees it (vLLM's): text parts joined, an assistant's
    ``tool_calls`` with their arguments parsed from JSON, a tool message's ``tool_call_id``."""
    import json
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ChatTemplateError("messages: each message is an object with a role")
    try:
        msg = {"role": m["role"], "content": message_text(m.get("content"))}
    except ChatTemplateError as e:                    # a part of a type this does not take
        raise ChatTemplateError(f"messages: {e}") from None
    except (AttributeError, TypeError):
        raise ChatTemplateError("messages: a message's content is a string or a list of text parts") from None
    if m.get("name"):
        msg["name"] = m["name"]
    if m.get("tool_call_id") is not None:
        msg["tool_call_id"] = m["tool_call_id"]
    if m.get("tool_calls") is not None:
        calls = []
        for call in m["tool_calls"]:
            call = dict(call)
            fn = call.get("function")
            if isinstance(fn, dict) and not fn.get("arguments"):
                # none, null or "": no arguments, {} (vLLM's _postprocess_messages; a template's tojson of a missing
                # value raised)
                call["function"] = {**fn, "arguments": {}}
            elif isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    args = json.loads(fn["arguments"])
                    # a "\ud800" escape inside the arguments' JSON text decodes to an unpaired surrogate, which the
                    # tokenizer cannot take (the request's own strings were checked before)
                    json.dumps(args, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    raise ChatTemplateError("messages: a tool call's function.arguments holds an unpaired UTF-16 "
                                            "surrogate (a \\ud800-\\udfff escape without its pair), which is not "
                                            "Unicode text") from None
                except (ValueError, RecursionError) as e:
                    raise ChatTemplateError(f"messages: a tool call's function.arguments is not JSON ({e})") from None
                call["function"] = {**fn, "arguments": args}
            calls.append(call)
        msg["tool_calls"] = calls
    return msg


def chat_prompt(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
                tools: list | None = None, documents: list | None = None, chat_template: str | None = None,
                _continuing: bool = False) -> str:
    """The prompt text of a chat (tokenize it without adding special tokens: the template writes BOS itself).
    ``continue_final_message``: the prompt ends with the final (assistant) message's text, with none of what the
    template writes after a message, so that generation continues it (vLLM's option; the template is rendered
    without a generation prompt and cut after that text). ``tools``: described to the template (vLLM passes them
    even where none may be called); ``documents``: the same for a retrieval template's documents (vLLM's);
    ``chat_template_kwargs`` over both, except a ``chat_template`` among them, refused (vLLM's server takes one
    only where it trusts its requests' templates; ``LLM.chat`` takes it as its ``chat_template``).
    ``chat_template``: instead of the tokenizer's (``LLM.chat``'s option; the server takes none from a request).
    ChatTemplateError (its ``param`` the field to blame) where the chat cannot be rendered."""
    kwargs = dict(chat_template_kwargs or {})
    template = chat_template or (tokenizer.chat_template if tokenizer is not None else None)
    if tokenizer is None:
        raise ChatTemplateError("messages: this model has no tokenizer")
    if not template:
        raise ChatTemplateError("messages: this model has no chat template; use /v1/completions")
    taken = [k for k in kwargs if k in TEMPLATE_ARGS]
    if taken:
        raise ChatTemplateError(f"chat_template_kwargs: {taken[0]!r} is set by the request itself, not by "
                                "chat_template_kwargs", "chat_template_kwargs")
    if kwargs.get("chat_template") is not None:
        raise ChatTemplateError("chat_template_kwargs: a chat template given by the request is not supported by "
                                "this server (it renders the model's own)", "chat_template_kwargs")
    if not messages and not _continuing:
        raise ChatTemplateError("messages: at least one message is needed")
    if continue_final_message:
        last = messages[-1]
        role = last.get("role") if isinstance(last, dict) else None
        if role != "assistant":
            raise ChatTemplateError(f"continue_final_message: the final message must be the assistant's, not "
                                    f"{role!r}", "continue_final_message")
    msgs = [template_message(m) for m in messages]
    given = kwargs
    own = {k: v for k, v in (("tools", tools), ("documents", documents)) if v is not None}
    kwargs = {**own, **kwargs}      # vLLM: chat_template_kwargs (tools, documents among them) over the request's own

    def render(msgs):
        try:
            return render_chat(template, msgs, add_generation_prompt=add_generation_prompt,
                               bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, **kwargs)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"messages: {e}") from None
        except TypeError as e:
            # a keyword the template cannot take, or a value of the wrong type: the request's chat_template_kwargs
            # where it gave some, else what its messages made of the template
            if given:
                raise ChatTemplateError(f"chat_template_kwargs: {e}", "chat_template_kwargs") from None
            raise ChatTemplateError(f"messages: the chat template could not render them ({e})") from None
    text = render(msgs)              # the whole chat first: a template that refuses it is heard (vLLM renders it)
    if continue_final_message and not msgs[-1]["content"]:
        # an empty final message: continuing it is starting the assistant's turn
        return chat_prompt(tokenizer, messages[:-1], add_generation_prompt=True, chat_template_kwargs=given,
                           tools=tools, documents=documents, chat_template=chat_template, _continuing=True)
    return _cut_after_final(text, msgs, render) if continue_final_message else text


def _cut_after_final(text: str, msgs: list[dict], render) -> str:
    """``text`` (the rendered chat) cut right after the final message's text. Where that text starts is found by
    rendering the chat again with a marker for it (so a final text that also occurs later, in the template's
    closing tag, is not mistaken for it); a template that writes the marker otherwise falls back to the text's
    last occurrence."""
    import uuid
    final = msgs[-1]["content"]
    marker = f"JAXDYNFINALMESSAGE{uuid.uuid4().hex}"
    marked = render([*msgs[:-1], {**msgs[-1], "content": marker}])
    start = marked.find(marker)
    if start >= 0 and text[:start] == marked[:start]:
        for piece in (final, final.strip()):          # as given, or a template that strips the message's text
            if piece and text.startswith(piece, start):
                return text[:start + len(piece)]
    end = text.rfind(final) if final else -1
    if end < 0 and final.strip():
        final = final.strip()
        end = text.rfind(final)
    if end < 0:
        raise ChatTemplateError("continue_final_message: the chat template does not write the final message's "
                                "text as given, so it cannot be continued", "continue_final_message")
    return text[:end + len(final)]
