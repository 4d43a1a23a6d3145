"""OpenAI request bodies (pydantic): the fields of vLLM's OpenAI server; unknown fields are ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      field_validator)
from pydantic_core import PydanticCustomError

Number = Union[StrictInt, StrictFloat]


def _whole(v):
    """A float with no fractional part as the integer it is (``max_tokens: 2.0``, which vLLM takes); anything
    else as it came, for StrictInt to judge (2.5, "2" and true stay refused)."""
    return int(v) if type(v) is float and v.is_integer() else v


# an integer field: an int, or a float of an integer's value
Int = Annotated[StrictInt, BeforeValidator(_whole)]


def _invalid(msg: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", "{msg}", {"msg": msg})


def check_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """OpenAI's tool definitions: ``{"type": "function", "function": {"name": <non-empty string>, "description"?:
    <string>, "parameters"?: <object>}}`` each (what the chat template renders and a tool parser matches); a
    missing ``type`` is "function" (vLLM's default), filled in for the template."""
    for i, tool in enumerate(tools or ()):
        fn = tool.get("function")
        if tool.setdefault("type", "function") != "function" or not isinstance(fn, dict):
            raise _invalid(f'item {i} must be {{"type": "function", "function": {{"name": ...}}}}')
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _invalid(f"item {i}: function.name must be a non-empty string")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise _invalid(f"item {i}: function.description must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _invalid(f"item {i}: function.parameters must be a JSON Schema object")
    return tools


def check_tool_choice(choice: Any) -> Any:
    """OpenAI's tool_choice: "none", "auto", "required" or ``{"type": "function", "function": {"name": ...}}``
    (``type`` may be left out, as vLLM allows)."""
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    if (isinstance(choice, dict) and choice.get("type", "function") == "function" and isinstance(fn, dict)
            and isinstance(fn.get("name"), str) and fn["name"]):
        return choice
    raise _invalid(f'must be "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}, '
                   f"got {repr(choice)[:60]}")


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False


class _Sampling(_Base):
    model: StrictStr | None = None
    max_tokens: Int | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: Int | None = None
    min_p: Number | None = None
    n: Int | None = 1
    seed: Int | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool | None = False
    min_tokens: Int | None = 0
    presence_penalty: Number | None = 0.0
    frequency_penalty: Number | None = 0.0
    repetition_penalty: Number | None = None
    include_stop_str_in_output: StrictBool | None = False
    skip_special_tokens: StrictBool | None = True
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    priority: Annotated[Int, Field(ge=-2**31, le=2**31 - 1)] | None = 0    # a worker's gRPC field is int32
    truncate_prompt_tokens: Int | None = None
    truncation_side: Literal["left", "right"] | None = None
    return_tokens_as_token_ids: StrictBool | None = False
    logit_bias: dict[StrictStr, Number] | None = None    # token id (as a string, OpenAI's) -> bias, clamped to +-100
    allowed_token_ids: list[StrictInt] | None = None     # vLLM's: only these ids may be drawn
    prompt_logprobs: Int | None = None       # vLLM's: each prompt token's logprob and the top ones
    cache_salt: StrictStr | None = None            # vLLM's: the prefix cache shares KV only within one salt
    # OpenAI / vLLM fields this server does not implement: a request that uses one is refused by name
    # (serving.app.UNSUPPORTED) instead of being served as if the field were absent
    best_of: Any = None
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    logits_processors: Any = None
    use_beam_search: Any = None
    bad_words: Any = None
    spaces_between_special_tokens: Any = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: Int | None = None
    echo: StrictBool | None = False
    suffix: StrictStr | None = None
    add_special_tokens: StrictBool | None = True


class ChatMessage(_Base):
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None     # an assistant's earlier calls, rendered by the template
    tool_call_id: StrictStr | None = None               # a tool message's answer to one


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Int | None = None
    echo: StrictBool | None = False
    add_generation_prompt: StrictBool | None = True
    continue_final_message: StrictBool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None     # described to the template; read for calls with a tool parser
    documents: list[dict[str, Any]] | None = None    # vLLM's: described to a retrieval template as ``documents``
    add_special_tokens: StrictBool | None = False    # vLLM's: the tokenizer's special tokens (BOS) on top of the template's
    chat_template: Any = None                     # vLLM's per-request template: refused (serving.app.UNSUPPORTED)
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: StrictBool | None = None    # false: a reply's first tool call only

    _tools = field_validator("tools")(check_tools)
    _tool_choice = field_validator("tool_choice")(check_tool_choice)


class TokenizeRequest(_Base):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: StrictBool | None = None     # None: vLLM's defaults, true for a prompt, false for messages
    add_generation_prompt: StrictBool | None = True
    continue_final_message: StrictBool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    chat_template: Any = None                         # refused, as by /v1/chat/completions

    _tools = field_validator("tools")(check_tools)


class DetokenizeRequest(_Base):
    model: StrictStr | None = None
    tokens: list[StrictInt]

