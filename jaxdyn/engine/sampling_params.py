"""SamplingParams: what a request asks of generation, validated with errors that name the field."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Sequence

MAX_LOGPROBS = 20    # top-logprobs computed on the device per sampled token (OpenAI's cap)
MIN_TEMPERATURE = 1e-2   # a temperature in (0, this) is this (vLLM's _MAX_TEMP): logits / T overflows float32 below ~1e-37
MAX_LOGIT_BIAS = 32  # logit_bias entries a request may set: the size of the step's per-row block (runner.MAX_BANNED),
                     # which also holds min_tokens' bans and allowed_token_ids


def _f32_finite(x) -> bool:
    """Whether ``x`` (an int of any size or a float) is a finite float32: the step packs biases as float32, where
    an overflow to inf would turn a ban's -inf into NaN."""
    try:
        return math.isfinite(x) and abs(float(x)) <= 3.4028234663852886e38
    except OverflowError:
        return False


class SamplingParamsError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16           # None: up to the model's context length
    min_tokens: int = 0
    temperature: float = 1.0              # 0: greedy
    top_k: int = 0                        # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0       # over prompt and output tokens
    presence_penalty: float = 0.0         # over output tokens
    frequency_penalty: float = 0.0        # over output tokens
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None           # top-k logprobs per sampled token (0: only the token's)
    # top-k logprobs of each prompt token given the tokens before it (0: only the token's; the first has none)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit before penalties and sampling
    # only these ids may be drawn (vLLM's): every other logit -inf before penalties and sampling; at most
    # MAX_LOGIT_BIAS - 1 distinct ids (they share the step's per-row block with logit_bias and min_tokens' bans)
    allowed_token_ids: Sequence[int] | None = None
    # vLLM's cache_salt (a request's field there, carried here with its parameters so that it reaches every engine
    # and worker that computes it): the prefix cache shares KV only between requests with the same salt
    cache_salt: str | None = None

    def __post_init__(self):
        self._plain_numbers()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids", "allowed_token_ids"):   # lists (not a string of ids or a number)
            v = getattr(self, name)
            if v is not None and (isinstance(v, (str, bytes, dict)) or not isinstance(v, Iterable)):
                raise SamplingParamsError(name, f"must be a list, got {type(v).__name__}")
        self.stop = list(self.stop or ())
        self.stop_token_ids = list(self.stop_token_ids or ())
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1:
            self.seed = None          # vLLM's "no seed" (clients send -1 for a random draw), not a fixed seed
        self.validate()
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE

    _INTS = ("n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs")
    _FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")

    def _plain_numbers(self) -> None:
        """NumPy's (or any) integer and real scalars as Python's int and float (vLLM takes them; the step packs and
        workers' JSON carry Python numbers); a bool stays a bool (refused where a number is asked)."""
        def as_int(v):
            return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v

        def as_float(v):
            return float(v) if isinstance(v, numbers.Real) and not isinstance(v, (bool, int)) else v

        for name in self._INTS:
            setattr(self, name, as_int(getattr(self, name)))
        for name in self._FLOATS:
            setattr(self, name, as_float(getattr(self, name)))
        for name in ("stop_token_ids", "allowed_token_ids"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)) or hasattr(v, "tolist"):
                setattr(self, name, [as_int(t) for t in (v.tolist() if hasattr(v, "tolist") else v)])
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {as_int(t): as_float(b) for t, b in self.logit_bias.items()}

    def validate(self) -> None:
        def need(cond, param, msg):
            if not cond:
                raise SamplingParamsError(param, msg)

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        need(is_int(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
             "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        need(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
             f"must be an integer >= 0, got {self.min_tokens!r}")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        need(is_num(self.temperature) and 0 <= self.temperature <= 100, "temperature",
             f"must be in [0, 100], got {self.temperature!r}")
        need(is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be -1, 0 or a positive integer, got {self.top_k!r}")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        need(is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty",
             f"must be in (0, 10], got {self.repetition_penalty!r}")
        need(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
             f"must be in [-2, 2], got {self.presence_penalty!r}")
        need(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
             f"must be in [-2, 2], got {self.frequency_penalty!r}")
        need(self.seed is None or (is_int(self.seed) and -2**63 <= self.seed < 2**64), "seed",
             f"must be an integer, got {self.seed!r}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(len(self.stop) <= 16, "stop", "at most 16 stop strings")
        need(not self.stop or self.detokenize is not False, "stop",
             "stop strings need detokenize=True (their match is on the text)")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "must be non-negative integers")
        need(len(self.stop_token_ids) <= 16, "stop_token_ids", "at most 16 ids")
        need(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        need(self.prompt_logprobs is None or (is_int(self.prompt_logprobs)
                                              and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             "prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        bias = self.logit_bias
        need(bias is None or isinstance(bias, dict), "logit_bias", "must map token ids to numbers")
        if bias:
            need(all(is_int(t) and t >= 0 for t in bias), "logit_bias", "keys must be token ids (integers >= 0)")
            need(all(is_num(b) and _f32_finite(b) for b in bias.values()), "logit_bias",
                 "values must be finite numbers within float32's range (+-3.4e38)")
            need(len(bias) <= MAX_LOGIT_BIAS, "logit_bias", f"at most {MAX_LOGIT_BIAS} token ids")
        need(self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt), "cache_salt",
             "must be a non-empty string")
        allowed = self.allowed_token_ids
        if allowed is not None:
            need(allowed and all(is_int(t) and t >= 0 for t in allowed), "allowed_token_ids",
                 "must be a non-empty list of token ids (integers >= 0)")
            need(len(set(allowed)) < MAX_LOGIT_BIAS, "allowed_token_ids",
                 f"at most {MAX_LOGIT_BIAS - 1} distinct token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def uses_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


# generation_config.json's fields that set a request's defaults, as vLLM's ``--generation-config auto`` reads
# them (``get_diff_sampling_param``): the SamplingParams field each gives
GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_config_dir(setting: str | None, model) -> str | None:
    """Where vLLM's ``--generation-config`` ``setting`` reads the defaults from: "auto", ``model``'s directory (a
    preset has none); "vllm" or None, nowhere; else the folder it names."""
    import os
    if setting == "auto":
        return model if isinstance(model, str) and os.path.isdir(model) else None
    return None if setting == "vllm" else setting


def generation_defaults(source: str | None) -> dict:
    """The sampling defaults a model's ``generation_config.json`` sets (vLLM's ``--generation-config``): ``source``
    a directory that holds one ("auto" passes the model's; a directory without the file gives none), or None /
    "vllm" for none. Returns {SamplingParams field: value}; ValueError naming the file and field for a value no
    request could carry."""
    import json
    import os
    if source is None or source == "vllm":
        return {}
    path = os.path.join(source, "generation_config.json")
    if not os.path.isfile(path):
        if not os.path.isdir(source):
            raise ValueError(f"--generation-config {source}: not a directory (expected auto, vllm, or a folder "
                             f"holding generation_config.json)")
        return {}
    try:
        with open(path) as f:
            gen = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not a valid generation config ({e})") from None
    if not isinstance(gen, dict):
        raise ValueError(f"{path}: not a valid generation config (not a JSON object)")
    out = {field: gen[key] for key, field in GENERATION_CONFIG_FIELDS.items() if gen.get(key) is not None}
    try:
        SamplingParams(**out)
    except SamplingParamsError as e:
        key = next((k for k, f in GENERATION_CONFIG_FIELDS.items() if f == e.param), e.param)
        raise ValueError(f"{path}: {key}: {str(e).split(': ', 1)[-1]}") from None
    return out
