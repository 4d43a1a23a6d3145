"""Benchmark prompts, reproducible from a seed: random, shared-prefix, multi-turn, ShareGPT, and
ShareGPT-shaped random prompts (``sharegpt-lengths``: the lengths of ShareGPT, no file needed).

Lengths are in tokens of the given tokenizer. Random text is drawn from the
tokenizer's vocabulary (special tokens excluded), decoded and re-encoded until
it is exactly the asked length, as vLLM's random dataset does. Without a
tokenizer the text is drawn from a word list and a word counts as one token
(approximate: the server's usage gives the real counts); with only a
vocabulary size (``bench offline`` on a model without a tokenizer) prompts are
token ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

import numpy as np

from serving.bench import BenchError

DATASETS = ("random", "prefix", "multiturn", "sharegpt", "sharegpt-lengths")

# Text for runs without a tokenizer: common short English words (one token each in most vocabularies).
WORDS = ("the of and to in is was he for it with as his on be at by had are but from or have an they "
         "which one you were all her she there would their we him been has when who will no more if out "
         "so said what up its about than into them can only other time new some could these two may first "
         "then do any like my now over such our man me even most made after also did many off before must "
         "well back through years much where your way down should because each just those people how too "
         "little state good very make world still own see men work long get here between both life being "
         "under never day same another know while last might us great old year since against go came right "
         "used take three").split()


@dataclasses.dataclass
class Sample:
    """One request of a dataset. Multi-turn samples carry only the turn's new user message: the
    request itself (history + replies + this message) is built when the previous turn has answered."""
    prompt: str | list[int]            # text, or token ids
    prompt_len: int | None             # tokens as a server counts a completions prompt; None: unknown
    output_len: int                    # max_tokens
    conversation: int | None = None    # multiturn: which conversation
    turn: int = 0                      # multiturn: which turn of it


class PromptSource:
    """Random prompt material of a given length in tokens, and token counts of any text."""

    def __init__(self, rng: np.random.Generator, tokenizer=None, vocab_size: int | None = None):
        self.rng = rng
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        if tokenizer is not None:
            # ordinary tokens that decode to whole characters (not a fragment of a multi-byte one)
            special = tokenizer.special_ids
            self._ids = np.array([i for i in range(tokenizer.vocab_size) if i not in special
                                  and "\ufffd" not in tokenizer.decode([i])], dtype=np.int64)
            if len(self._ids) == 0:
                raise BenchError("the tokenizer has no ordinary tokens to draw prompts from")
        # the tokens a text prompt gets from the tokenizer besides its own (a BOS): drawn lengths count them, as
        # vLLM's datasets do (num_special_tokens_to_add), so a prompt of length n is n tokens at the server
        self.specials = 0 if tokenizer is None else len(tokenizer.encode("", add_special_tokens=True))

    @property
    def exact(self) -> bool:
        """Whether lengths and counts are exact token counts (a tokenizer, or token ids)."""
        return self.tokenizer is not None or self.vocab_size is not None

    def make(self, n: int) -> str | list[int]:
        """n tokens of random text (token ids when there is only a vocabulary size)."""
        if self.tokenizer is None:
            if self.vocab_size is not None:
                return [int(t) for t in self.rng.integers(0, self.vocab_size, n)]
            return " ".join(self.rng.choice(WORDS, n))
        tok = self.tokenizer
        ids = [int(t) for t in self.rng.choice(self._ids, n)]
        text = ""
        for _ in range(20):   # decoding random ids may merge or split tokens; re-encode until it is n long
            text = tok.decode(ids)
            again = tok.encode(text, add_special_tokens=False)
            if len(again) == n:
                return text
            ids = again[:n] if len(again) > n else again + [int(t) for t in self.rng.choice(self._ids, n - len(again))]
        return text

    def prompt(self, n: int) -> str | list[int]:
        """A prompt of n tokens as the server counts them (its special tokens included, as vLLM's datasets draw
        them: ``n`` less ``specials`` tokens of text)."""
        return self.make(max(n - self.specials, 0))

    def join(self, a: str | list[int], b: str | list[int]) -> str | list[int]:
        if isinstance(a, list):
            return a + b
        return a + b if self.tokenizer is not None else f"{a} {b}"

    def count(self, prompt: str | list[int], special: bool = True) -> int:
        """Tokens in a prompt as a server counts it (``special``: with the BOS a completions prompt gets);
        without a tokenizer, the number of words."""
        if isinstance(prompt, list):
            return len(prompt)
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(prompt, add_special_tokens=special))
        return len(prompt.split())


def add_arguments(p: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """The dataset flags shared by ``bench serve`` and ``bench offline`` (vLLM's names where it has them);
    ``seed=False`` where the parser already has a ``--seed``."""
    p.add_argument("--dataset", "--dataset-name", dest="dataset", choices=DATASETS, default="random",
                   help="random: random token lengths; prefix: --num-prefixes shared prefixes of --prefix-len "
                   "tokens with distinct --suffix-len suffixes; multiturn: conversations of --num-turns turns "
                   "that resend their history (earlier prompts and the actual replies); sharegpt: the first "
                   "exchange of each conversation of the ShareGPT JSON file --dataset-path; sharegpt-lengths: random "
                   "prompts and max_tokens drawn from ShareGPT's length distribution as vLLM samples it (mean 215 "
                   "prompt / 198 output tokens, Llama-3 tokenizer), for runs without the file")
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file (--dataset sharegpt)")
    p.add_argument("--sharegpt-replies", choices=SHAREGPT_REPLY_SHAPES, default="chatgpt",
                   help="sharegpt-lengths: the shape of the reply lengths, chatgpt (ChatGPT's first replies in "
                   "ShareGPT, as vLLM's SOSP'23 artifact measured them; default) or lognormal (sigma 1, the "
                   "assumption of figures before 2026-12-03)")
    p.add_argument("--num-prompts", type=int, default=200, help="requests to send (multiturn: all turns)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    p.add_argument("--random-input-len", "--input-len", dest="input_len", type=int, default=1024,
                   help="random: prompt tokens")
    p.add_argument("--random-output-len", "--output-len", dest="output_len", type=int, default=None,
                   help="max_tokens of every request (default 128; sharegpt and sharegpt-lengths: the reply's "
                        "length)")
    p.add_argument("--random-range-ratio", dest="range_ratio", type=float, default=0.0,
                   help="random: lengths drawn uniformly from [len * (1 - r), len * (1 + r)]")
    p.add_argument("--prefix-len", type=int, default=256, help="prefix: tokens of each shared prefix")
    p.add_argument("--suffix-len", type=int, default=64, help="prefix: tokens of each request's own suffix")
    p.add_argument("--num-prefixes", type=int, default=4, help="prefix: distinct shared prefixes")
    p.add_argument("--num-turns", type=int, default=4, help="multiturn: turns per conversation")
    p.add_argument("--turn-len", type=int, default=64, help="multiturn: tokens of each new user message")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so every request generates exactly max_tokens (default: on)")


def check_arguments(args) -> None:
    def at_least(name: str, low: int) -> None:
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise BenchError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")

    at_least("num_prompts", 1)
    at_least("seed", 0)                 # a SeedSequence's entropy (bench offline's --seed is the engine's too)
    if args.dataset == "random":
        at_least("input_len", 1)
    at_least("output_len", 1)
    if not 0.0 <= args.range_ratio < 1.0:
        raise BenchError(f"--random-range-ratio must be in [0, 1), got {args.range_ratio}")
    if args.dataset == "prefix":
        at_least("prefix_len", 1)
        at_least("suffix_len", 1)
        at_least("num_prefixes", 1)
    if args.dataset == "multiturn":
        at_least("num_turns", 1)
        at_least("turn_len", 1)
    if args.dataset == "sharegpt":
        if args.dataset_path is None:
            raise BenchError("--dataset sharegpt needs --dataset-path FILE.json")
        if not os.path.isfile(args.dataset_path):
            raise BenchError(f"--dataset-path {args.dataset_path!r}: no such file")
    elif args.dataset_path is not None:
        raise BenchError(f"--dataset-path is for --dataset sharegpt, not {args.dataset}")


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator per ``stream`` of one seed (the prompts of each run, its arrival times, ...)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=stream))


def load_samples(args, source: PromptSource, n: int | None = None) -> list[Sample]:
    """The dataset's samples (``n``, default --num-prompts) in the order they are sent."""
    output_len = args.output_len or 128
    n = n or args.num_prompts
    if args.dataset == "random":
        return random_samples(source, n, args.input_len, output_len, args.range_ratio)
    if args.dataset == "prefix":
        return prefix_samples(source, n, args.num_prefixes, args.prefix_len, args.suffix_len, output_len)
    if args.dataset == "multiturn":
        return multiturn_samples(source, n, args.num_turns, args.turn_len, output_len)
    if args.dataset == "sharegpt-lengths":
        return sharegpt_length_samples(source, n, args.sharegpt_replies, args.output_len)
    return sharegpt_samples(source, args.dataset_path, n, args.output_len)


def _lengths(rng: np.random.Generator, n: int, length: int, ratio: float) -> np.ndarray:
    low, high = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return rng.integers(low, high + 1, n)


def random_samples(source: PromptSource, n: int, input_len: int, output_len: int,
                   range_ratio: float = 0.0) -> list[Sample]:
    ins = _lengths(source.rng, n, input_len, range_ratio)
    outs = _lengths(source.rng, n, output_len, range_ratio)
    out = []
    for i, o in zip(ins, outs):
        prompt = source.prompt(int(i))
        out.append(Sample(prompt, source.count(prompt), int(o)))
    return out


def prefix_samples(source: PromptSource, n: int, num_prefixes: int, prefix_len: int, suffix_len: int,
                   output_len: int) -> list[Sample]:
    """Request i continues prefix i mod N with its own random suffix; sent in a seeded random order."""
    prefixes = [source.make(prefix_len) for _ in range(num_prefixes)]
    samples = []
    for i in range(n):
        prompt = source.join(prefixes[i % num_prefixes], source.make(suffix_len))
        samples.append(Sample(prompt, source.count(prompt), output_len))
    return [samples[i] for i in source.rng.permutation(n)]


def multiturn_samples(source: PromptSource, n: int, num_turns: int, turn_len: int,
                      output_len: int) -> list[Sample]:
    """ceil(n / num_turns) conversations (the last may be shorter), n turns in all, ordered turn by turn:
    every conversation's first turn, then every second turn, ..."""
    num_conv = math.ceil(n / num_turns)
    turns = [min(num_turns, n - c * num_turns) for c in range(num_conv)]
    return [Sample(source.make(turn_len), None, output_len, conversation=c, turn=t)
            for t in range(num_turns) for c in range(num_conv) if t < turns[c]]


def sharegpt_samples(source: PromptSource, path: str, n: int, output_len: int | None) -> list[Sample]:
    """The first human turn of each conversation as the prompt; the reply's length (or ``output_len``) as
    max_tokens. As vLLM does: conversations are shuffled with the seed, and with a tokenizer those with a
    prompt or reply under 4 tokens, a prompt over 1024 or prompt + reply over 2048 are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BenchError(f"--dataset-path {path}: cannot be read as JSON: {str(e) or type(e).__name__}") from None
    if not isinstance(data, list):
        raise BenchError(f"--dataset-path {path}: expected a JSON list of conversations (ShareGPT format)")
    pairs = []
    for entry in data:
        conv = entry.get("conversations", entry.get("conversation")) if isinstance(entry, dict) else None
        if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(m, dict) for m in conv[:2]):
            continue
        prompt, reply = conv[0].get("value"), conv[1].get("value")
        if isinstance(prompt, str) and isinstance(reply, str) and prompt:
            pairs.append((prompt, reply))
    if not pairs:
        raise BenchError(f"--dataset-path {path}: no conversation with a prompt and a reply "
                         "(expected [{\"conversations\": [{\"from\": \"human\", \"value\": ...}, ...]}, ...])")
    if output_len is None and source.tokenizer is None:
        raise BenchError("--dataset sharegpt: give --tokenizer (to measure the replies) or --output-len")
    samples = []
    for i in source.rng.permutation(len(pairs)):
        prompt, reply = pairs[i]
        prompt_len = source.count(prompt) if source.tokenizer is not None else None
        out = output_len or source.count(reply, special=False)
        # (the reply's floor only on measured replies: a fixed --output-len below 4 dropped every one, as vLLM's
        # is_valid_sequence skips that check when the output length is given)
        if source.tokenizer is not None and (prompt_len < 4 or (out < 4 and output_len is None) or prompt_len > 1024
                                             or prompt_len + out > 2048):
            continue
        samples.append(Sample(prompt, prompt_len, out))
        if len(samples) == n:
            return samples
    raise BenchError(f"--dataset-path {path}: only {len(samples)} usable conversations, fewer than "
                     f"--num-prompts {n}")


# ShareGPT as vLLM's sampler draws it (first exchange of each conversation, seed 0; dropped: prompt or reply
# under 4 tokens, prompt over 1024, prompt + reply over 2048), Llama-3 tokenizer, 1,000 prompts: 215,196
# prompt tokens and 198,343 reply tokens (vLLM benchmark_throughput with ignore_eos, as reprinted from
# zhihu.com/p/1928005367754884226; the same 215,196 appears in vLLM benchmark_serving logs). The shape of the
# prompt lengths follows the prompt-length CDF printed in sgl-project/sglang PR #1853 (Llama-3 tokenizer,
# 1,003 ShareGPT requests): its bins below, log-uniform inside each bin.
SHAREGPT_MEAN_PROMPT = 215.196
SHAREGPT_MEAN_OUTPUT = 198.343
_SHAREGPT_PROMPT_BINS = ((4, 20, 244), (20, 50, 148), (50, 100, 89), (100, 200, 89), (200, 500, 276),
                         (500, 1000, 155), (1000, 1024, 2))          # (low, high, requests of 1,003)

# The shape of the replies: ChatGPT's first replies in ShareGPT as measured in vLLM's SOSP'23 artifact
# (github.com/sosp-ae-39/sosp-ae-astra, datasets/sharegpt_opt_text_completion_length.pkl: the (prompt, reply)
# lengths of the first exchange of 84,226 ShareGPT conversations of March 2023, OPT tokenizer), kept by vLLM's
# sampling rules (both >= 4, prompt <= 1024, prompt + reply <= 2048: 74,704 pairs, mean reply 348.4, std 284.4,
# median 280, p99 1,292, max 2,009; prompt and reply lengths correlate at 0.12, so they are drawn independently):
# the reply-length quantiles below, at percentiles 0, 1, ..., 99, 99.1, ..., 99.9, 99.95, 99.99, 100,
# interpolated linearly and scaled to the Llama-3 mean above. The tokenizer and the file differ from vLLM's
# sample (Llama-3, ShareGPT_V3), so the mean is the published one; the shape is the artifact's.
_CHATGPT_REPLY_PERCENTILES = np.array(list(range(100)) + [99.0 + k / 10 for k in range(1, 10)] + [99.95, 99.99, 100.0])
_CHATGPT_REPLY_QUANTILES = np.array([
    4, 11, 17, 22, 27, 32, 36, 41, 47, 53, 59, 66, 71, 76, 82, 87,
    92, 97, 102, 107, 112, 117, 123, 128, 134, 140, 146, 151, 158, 164, 170, 176,
    182, 188, 194, 199, 205, 211, 216, 221, 226, 232, 238, 243, 248, 253, 258, 263,
    269, 274, 280, 285, 290, 296, 302, 308, 313, 319, 325, 332, 338, 344, 351, 357,
    364, 372, 379, 387, 394, 403, 412, 422, 432, 443, 454, 468, 479, 491, 506, 520,
    534, 552, 569, 589, 609, 630, 653, 680, 708, 739, 764, 772, 796, 823, 862, 919,
    981, 1058, 1153, 1292, 1321, 1347, 1385, 1417, 1450, 1486, 1534, 1607, 1710, 1810, 1903, 2009,
], np.float64)
# The earlier assumption, kept for comparison with figures measured on it (``--sharegpt-replies lognormal``):
# lognormal with sigma 1 (median = mean / e^0.5). Its tail is far heavier than the artifact's (p99 / median 10
# against 4.6; in 1,000 draws the longest reply is ~2,040 tokens against ~1,120).
_SHAREGPT_OUTPUT_SIGMA = 1.0
SHAREGPT_REPLY_SHAPES = ("chatgpt", "lognormal")


def sharegpt_lengths(rng: np.random.Generator, n: int, replies: str = "chatgpt") -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, output lengths) of ``n`` requests shaped like vLLM's ShareGPT sample: prompts in
    [4, 1024], replies >= 4, prompt + reply <= 2047 (2048 with a BOS), and the two means equal to
    ShareGPT's (215.2, 198.3) to within rounding for any ``n`` large enough to hold them. ``replies``: the
    shape of the reply lengths, ``chatgpt`` (measured, vLLM's artifact) or ``lognormal`` (sigma 1, assumed)."""
    if replies not in SHAREGPT_REPLY_SHAPES:
        raise BenchError(f"ShareGPT reply shape must be one of {', '.join(SHAREGPT_REPLY_SHAPES)}, got {replies!r}")
    lows, highs, counts = (np.array(c, np.float64) for c in zip(*_SHAREGPT_PROMPT_BINS))
    which = rng.choice(len(counts), n, p=counts / counts.sum())
    u = rng.random(n)
    prompt = np.exp(np.log(lows[which]) + u * (np.log(highs[which]) - np.log(lows[which])))
    if replies == "chatgpt":
        output = np.interp(rng.random(n) * 100.0, _CHATGPT_REPLY_PERCENTILES, _CHATGPT_REPLY_QUANTILES)
    else:
        z = rng.standard_normal(n)
        output = np.exp(np.log(SHAREGPT_MEAN_OUTPUT) - _SHAREGPT_OUTPUT_SIGMA ** 2 / 2 + _SHAREGPT_OUTPUT_SIGMA * z)
    prompt = _scaled_to_mean(prompt, SHAREGPT_MEAN_PROMPT, 4, np.full(n, 1024))
    output = _scaled_to_mean(output, SHAREGPT_MEAN_OUTPUT, 4, 2047 - prompt)    # + BOS: 2048 at most
    return prompt, output


def _scaled_to_mean(x: np.ndarray, mean: float, low: int, high: np.ndarray) -> np.ndarray:
    """x scaled so that, rounded and clipped to [low, high], its mean is ``mean`` (bisection on the scale)."""
    lo, hi = 0.0, 4.0 * mean / max(float(x.mean()), 1e-9)
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.clip(np.rint(x * mid), low, high).mean() < mean:
            lo = mid
        else:
            hi = mid
    return np.clip(np.rint(x * hi), low, high).astype(np.int64)


def sharegpt_length_samples(source: PromptSource, n: int, replies: str = "chatgpt",
                            output_len: int | None = None) -> list[Sample]:
    """Random prompts with ShareGPT's lengths (``sharegpt_lengths``); max_tokens = the drawn reply length, or
    ``output_len`` for every request (the prompts stay the same: the lengths are drawn either way). Prompt lengths
    are exact with a tokenizer or token ids; without either, in words."""
    prompts, outputs = sharegpt_lengths(source.rng, n, replies)
    out = []
    for i, o in zip(prompts, outputs):
        prompt = source.prompt(int(i))
        out.append(Sample(prompt, source.count(prompt), output_len or int(o)))
    return out
