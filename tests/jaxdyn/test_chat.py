"""A chat's prompt text (jaxdyn.engine.chat.chat_prompt), as the server's chat endpoints and LLM.chat build it."""

import types

import pytest

from jaxdyn.engine.chat import ChatTemplateError, chat_prompt

PLAIN = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
         "{% if add_generation_prompt %}<assistant>{% endif %}")
STRICT = ("{% for m in messages %}{% if m.role == 'assistant' and not m.content %}"
          "{{ raise_exception('empty assistant message') }}{% endif %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>"
          "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
TOK = types.SimpleNamespace(chat_template=PLAIN, bos_token="", eos_token="")
U = {"role": "user", "content": "hi"}


def test_continuing_a_final_message():
    assert chat_prompt(TOK, [U, {"role": "assistant", "content": "Hel"}], continue_final_message=True,
                       add_generation_prompt=False) == "<user>hi</user><assistant>Hel"
    # an empty final message is the assistant's turn starting, even as the only message
    assert chat_prompt(TOK, [U, {"role": "assistant", "content": ""}], continue_final_message=True,
                       add_generation_prompt=False) == "<user>hi</user><assistant>"
    assert chat_prompt(TOK, [{"role": "assistant"}], continue_final_message=True,
                       add_generation_prompt=False) == "<assistant>"


def test_the_whole_chat_is_rendered_first_and_checks_keep_their_order():
    strict = types.SimpleNamespace(chat_template=STRICT, bos_token="", eos_token="")
    with pytest.raises(ChatTemplateError, match="empty assistant message") as e:     # the template's own refusal
        chat_prompt(strict, [U, {"role": "assistant", "content": ""}], continue_final_message=True)
    assert e.value.param == "messages"
    # the final message's role is checked before its content parts
    bad = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    with pytest.raises(ChatTemplateError, match="must be the assistant's") as e:
        chat_prompt(TOK, [bad], continue_final_message=True)
    assert e.value.param == "continue_final_message"
    with pytest.raises(ChatTemplateError, match="image_url") as e:
        chat_prompt(TOK, [bad])
    assert e.value.param == "messages"
    with pytest.raises(ChatTemplateError, match="at least one message"):
        chat_prompt(TOK, [])
    with pytest.raises(ChatTemplateError, match="'add_generation_prompt' is set by the request") as e:
        chat_prompt(TOK, [U], chat_template_kwargs={"add_generation_prompt": False})
    assert e.value.param == "chat_template_kwargs"


@pytest.mark.parametrize("template, words", [
    # a macro calling itself without end, and tojson of a value nested past the stack
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nested too deep"),
    ("{{ deep | tojson }}", "nested too deep"),
    ("{% for i in range(10 ** 9) %}{% endfor %}", "range"),          # the sandbox's range limit
])
def test_a_template_that_recurses_or_overflows_is_a_chat_template_error(template, words):
    """RecursionError and OverflowError out of a template were no ChatTemplateError: the server answered 500."""
    deep = []
    for _ in range(5000):
        deep = [deep]
    tok = types.SimpleNamespace(chat_template=template, bos_token="", eos_token="")
    with pytest.raises(ChatTemplateError, match=words) as e:
        chat_prompt(tok, [U], chat_template_kwargs={"deep": deep})
    assert e.value.param == "messages"


def test_documents_reach_the_template_and_a_chat_template_among_the_kwargs_is_refused():
    docs = [{"title": "a"}, {"title": "b"}]
    tok = types.SimpleNamespace(chat_template="{% for d in documents %}{{ d.title }};{% endfor %}" + PLAIN,
                                bos_token="", eos_token="")
    assert chat_prompt(tok, [U], documents=docs) == "a;b;<user>hi</user><assistant>"
    assert chat_prompt(tok, [U], documents=docs, chat_template_kwargs={"documents": docs[1:]}) == \
        "b;<user>hi</user><assistant>"
    with pytest.raises(ChatTemplateError, match="a chat template given by the request") as e:
        chat_prompt(TOK, [U], chat_template_kwargs={"chat_template": PLAIN})
    assert e.value.param == "chat_template_kwargs"


CALLS = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% for c in m.tool_calls or [] %}"
         "[{{ c.function.name }}:{{ c.function.arguments | tojson }}]{% endfor %}</{{ m.role }}>{% endfor %}")


def _with_call(function):
    return [U, {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function",
                                                                        "function": function}]}]


def test_earlier_calls_arguments_none_null_or_empty_are_an_empty_object_as_vllm_makes_them():
    """vLLM's _postprocess_messages: a tool call's arguments missing, null or "" become {} (a "" was refused as not
    JSON; a missing one made the template's tojson raise, blamed on chat_template_kwargs; null rendered null)."""
    tok = types.SimpleNamespace(chat_template=CALLS, bos_token="", eos_token="")
    for fn in ({"name": "f"}, {"name": "f", "arguments": None}, {"name": "f", "arguments": ""}):
        assert chat_prompt(tok, _with_call(fn), add_generation_prompt=False) == \
            "<user>hi</user><assistant>[f:{}]</assistant>"
    assert chat_prompt(tok, _with_call({"name": "f", "arguments": '{"a": [1]}'}), add_generation_prompt=False) == \
        '<user>hi</user><assistant>[f:{"a": [1]}]</assistant>'


def test_an_earlier_calls_arguments_escaping_an_unpaired_surrogate_are_refused_by_name():
    """A request's arguments string whose JSON escapes a lone surrogate ("\\\\ud800" in the request: its own strings
    are Unicode) decodes to text the tokenizer cannot take: a 400 naming it (was a TypeError out of the tokenizer,
    a 500); a pair (an emoji escaped) is text."""
    import json
    tok = types.SimpleNamespace(chat_template=CALLS, bos_token="", eos_token="")
    with pytest.raises(ChatTemplateError, match="unpaired UTF-16 surrogate") as e:
        chat_prompt(tok, _with_call({"name": "f", "arguments": json.dumps({"a": "\ud800"})}))
    assert e.value.param == "messages"
    got = chat_prompt(tok, _with_call({"name": "f", "arguments": json.dumps({"a": "\U0001F600"})}),
                      add_generation_prompt=False)
    assert "\\ud83d\\ude00" in got or "\U0001F600" in got


def test_a_templates_type_error_is_blamed_on_the_kwargs_only_where_the_request_gave_some():
    tok = types.SimpleNamespace(chat_template="{{ 'a' + messages | length }}", bos_token="", eos_token="")
    with pytest.raises(ChatTemplateError, match="could not render them") as e:
        chat_prompt(tok, [U])
    assert e.value.param == "messages"
    with pytest.raises(ChatTemplateError) as e:
        chat_prompt(tok, [U], chat_template_kwargs={"x": 1})
    assert e.value.param == "chat_template_kwargs"
