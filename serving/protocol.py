"""OpenAI request bodies (pydantic): the fields of vLLM's OpenAI server; unknown fields are ignored."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False


class _Sampling(_Base):
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    n: StrictInt | None = 1
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool | None = False
    min_tokens: StrictInt | None = 0
    presence_penalty: Number | None = 0.0
    frequency_penalty: Number | None = 0.0
    repetition_penalty: Number | None = None
    include_stop_str_in_output: StrictBool | None = False
    skip_special_tokens: StrictBool | None = True
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    priority: StrictInt | None = 0
    truncate_prompt_tokens: StrictInt | None = None
    truncation_side: Literal["left", "right"] | None = None
    return_tokens_as_token_ids: StrictBool | None = False
    logit_bias: dict[StrictStr, Number] | None = None    # token id (as a string, OpenAI's) -> bias, clamped to +-100
    allowed_token_ids: list[StrictInt] | None = None     # vLLM's: only these ids may be drawn
    prompt_logprobs: StrictInt | None = None       # vLLM's: each prompt token's logprob and the top ones
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
    logprobs: StrictInt | None = None
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
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    add_generation_prompt: StrictBool | None = True
    continue_final_message: StrictBool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None     # described to the template; calling them is refused (app.py)
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None


class TokenizeRequest(_Base):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: StrictBool | None = True
    add_generation_prompt: StrictBool | None = True
    continue_final_message: StrictBool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(_Base):
    model: StrictStr | None = None
    tokens: list[StrictInt]

