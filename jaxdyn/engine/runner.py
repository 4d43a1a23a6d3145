"""The model runner: turns one step's work into bucketed arrays and runs a compiled step.

Shapes come from two explicit bucket lists, tokens per step and pages per
sequence; the sequences per step follow the token bucket (``min(tokens,
max_num_seqs)``), which keeps the number of compiled shapes small, except where
``seq_buckets`` adds a token bucket with fewer sequence slots. The sampler
comes in four static variants (``greedy``, ``random``, ``plain``, ``full``: see
``jaxdyn.engine.sampler``), picked on the host when a step is packed from what
its rows ask for, so the executable holds no conditional on device data (a GPU
conditional syncs the host on its predicate every step). ``warmup()`` compiles
the step once per (token bucket, page bucket, variant) ahead of time
(``jit(...).lower(...).compile()``); a step calls the executable of its bucket
and variant, so nothing can compile while serving. With ``fail_on_compile`` (on
in tests) a step that observes any compilation in the process after warm-up
raises ``CompiledAfterWarmupError``.

Device state the runner owns and donates into every step (updated in place):
the KV pages, and ``token_pages`` (i32[num_pages, page_size]), the token id at
each cached position, which the sampler reads for penalties (written by every
variant, since a later step's penalties need the history).

A step is dispatched without waiting (``execute`` returns a handle); a
sequence whose next input is the token the previous step sampled names that
step's row (``prev_row``) and the token is taken on the device, so the host
can schedule and dispatch step N+1 before it has read step N's tokens.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh

from jaxdyn.engine.buckets import check_seq_buckets, is_count, powers_of_two, token_buckets_for
from jaxdyn.engine.compilation import CompiledAfterWarmupError, compilation_count, thread_compilation_count
from jaxdyn.engine.executable_cache import ExecutableCache, fingerprint
from jaxdyn.engine.sampler import ALLOWED_MARK, FULL, PLAIN, VARIANTS, SamplingArrays, sample, serves, variant_for
from jaxdyn.engine.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams
from jaxdyn.kv.cache import (FP8_KV_DTYPE, AttentionMetadata, KVCacheSpec, abstract_kv_cache, allocate_kv_cache,
                             check_kv_cache_dtype)
from jaxdyn.parallel.sharding import (
    kv_cache_partition_spec, model_parallel_size, param_shardings, replicated, stored_kv_heads)
from pallas_kernels.paged_decode import FP8_PRODUCTS, kernel_zeros, step_copy

# ids a row may bias at once: bans (EOS ids + stop_token_ids under min_tokens), logit_bias and allowed_token_ids
# (the request-level limit, SamplingParams', is the row's block)
MAX_BANNED = MAX_LOGIT_BIAS


# Packed step inputs: tok i32[_TOK_ROWS, T] = token ids, index in the sampled buffer of a token
# drawn by the previous step (-1: none), positions, slot page, slot offset; seqi i32[S+1,
# _SEQ_COLS + P + _BIAS_COLS] = kv_len, cu_q_len, logits row, top_k, prompt_len, seed's low 32
# bits, output index, index in the sampled buffer its draw goes to (2 * max_num_seqs: nowhere),
# seed's high 32 bits, page table, biased ids (-1 pads), their biases (float32 bits; -inf bans); seqf
# f32[S, _SEQF_COLS] = temperature, top_p, min_p, repetition, presence, frequency penalties.
_TOK_ROWS, _SEQ_COLS, _SEQF_COLS = 5, 9, 6
_BIAS_COLS = 2 * MAX_BANNED
_BAN_BITS = int(np.array(-np.inf, np.float32).view(np.int32))


def _i32_bits(x: int) -> int:
    """``x``'s low 32 bits as the int32 that holds them (a seed's half in the step's int32 rows)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


def _unpack(tok, seqi, seqf):
    S = seqf.shape[0]
    P = seqi.shape[1] - _SEQ_COLS - _BIAS_COLS
    md = AttentionMetadata(positions=tok[2], slot_page=tok[3], slot_offset=tok[4],
                           page_table=seqi[:S, _SEQ_COLS:_SEQ_COLS + P], kv_lens=seqi[:S, 0],
                           cu_q_lens=seqi[:, 1])
    sp = SamplingArrays(
        temperature=seqf[:, 0], top_k=seqi[:S, 3], top_p=seqf[:, 1], min_p=seqf[:, 2],
        repetition_penalty=seqf[:, 3], presence_penalty=seqf[:, 4], frequency_penalty=seqf[:, 5],
        prompt_lens=seqi[:S, 4], seeds=jax.lax.bitcast_convert_type(seqi[:S, 5], jnp.uint32),
        output_index=seqi[:S, 6], biased=seqi[:S, _SEQ_COLS + P:_SEQ_COLS + P + MAX_BANNED],
        bias=jax.lax.bitcast_convert_type(seqi[:S, _SEQ_COLS + P + MAX_BANNED:], jnp.float32),
        seeds_hi=jax.lax.bitcast_convert_type(seqi[:S, 8], jnp.uint32))
    return md, tok[0], tok[1], seqi[:S, 2], sp, seqi[:S, 7]


# Which row-parallel inputs of an fp8 model ``pallas_kernels.fp8_quantize`` may quantize (``fp8_fused_quantize``)
FUSED_QUANTIZE_SITES = ("off", "o_proj", "all")
# XLA options that turn its dot merger off (``RunnerConfig.xla_dot_merger``)
NO_DOT_MERGER = {"xla_disable_hlo_passes": "dot-merger"}
# XLA's options that send a step's matrix products to cuBLAS, not Triton (``RunnerConfig.triton_gemm_max_tokens``)
NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    page_size: int = 16
    num_pages: int = 512
    max_num_batched_tokens: int = 256      # tokens per step (largest token bucket)
    max_num_seqs: int = 32                 # sequences per step
    max_model_len: int = 2048              # tokens per sequence (sets the largest page bucket)
    token_buckets: tuple[int, ...] | None = None   # default: powers of two from 16
    page_buckets: tuple[int, ...] | None = None    # default: powers of two from 4
    max_copies: int = 16                   # page copies (copy-on-write) per copy call
    return_logits: bool = False            # also bring back each sequence's last-token logits
    fail_on_compile: bool = False          # raise if anything compiles after warm-up
    # executables compiled at once in warm-up (XLA compiles with the GIL released);
    # None: one per 2 host cores up to 8 on an accelerator, 1 on the CPU
    warmup_threads: int | None = None
    # True: the first sampler variant of each bucket compiles alone, one bucket after another, so that
    # XLA autotunes its matrix products with the GPU to itself. False: every step compiles on the warm-up
    # threads at once. Measured on an H200 (8B shape, five buckets, `benchmarks.gpu.start_probe`): cold
    # start 29.7 s against 51.2 s, step costs equal within 2 %, offline throughput 0.995x (noise).
    first_compiles_alone: bool = False
    # warm-up loads the compiled steps from this directory and saves those it compiles
    # (``jaxdyn.engine.executable_cache``); None: no cache
    executable_cache_dir: str | None = None
    # Split steps: a step whose tokens would mostly pad its bucket (600 decode rows in a 2,048-token
    # bucket) runs as the steps of smaller buckets one after another (two of 512 tokens), where the
    # buckets' step costs, measured at warm-up, add up to less (``ModelRunner.plan``).
    # None: on for accelerators, off on the CPU (where the measured costs are noise).
    split_steps: bool | None = None
    # XLA's dot merger joins dots that share an operand where one of them is small -- here each layer's q, k
    # and v projections (k's and v's are under its 32 MiB limit) -- by concatenating their weights, which
    # are arguments of the step: a 48 MiB copy a layer every step on the 8B shape, 0.8 ms a step on an H200
    # whatever its tokens (``benchmarks/gpu/profile_run.py``). False: the pass is off for the steps.
    xla_dot_merger: bool = False
    # The decode and prefill attention kernels store into one zeroed output, each its own rows
    # (``ragged_paged_attention(in_place=True)``), instead of two outputs merged by a select: one kernel a
    # layer less, and the decode kernel writes its query heads' rows, not 16-row tiles (8B shape on an H200,
    # ShareGPT-shaped offline run: the step costs of the 64-2,048-token buckets 1.5-3 % lower,
    # ``benchmarks/gpu/ab_offline.py``). The same numbers. False: the select (for A/B runs).
    attention_in_place: bool = True
    # XLA's Triton GEMMs only in steps of at most this many tokens: larger ones compile with
    # ``xla_gpu_enable_triton_gemm`` off, so their products go to cuBLAS / cuBLASLt and XLA does not autotune
    # Triton tilings for them. None: XLA's default in every step. For fp8 (w8a8) products the Triton search is
    # the cold start's cost (8B shape on an H200, buckets 16/512/2048, empty caches: warm-up 107.5 s with it,
    # 21.6 s without; bf16 29.1 s) and buys no throughput (ten buckets: 14,592 output tok/s with Triton in no
    # step, 14,722 with it in the 16- and 64-token steps, one run each; ``benchmarks/gpu/ab_offline.py``).
    triton_gemm_max_tokens: int | None = None
    # An fp8 model's steps of at most this many tokens multiply with ``pallas_kernels.fp8_matmul`` (bf16
    # activations, each fp8 weight tile made bf16 as it is read) instead of cuBLASLt's fp8 x fp8 product after a
    # per-token quantization: those steps are bound by the weights' read (``llama.Linear``). 0: never.
    fp8_kernel_max_tokens: int = 0
    # Which of an fp8 model's row-parallel inputs ``pallas_kernels.fp8_quantize`` quantizes, one kernel each
    # instead of XLA's reduction and conversion: "off", "o_proj" or "all" (``llama.Fp8Options``).
    fp8_fused_quantize: str = "off"
    # ``fp8_fused_quantize`` in steps of at least this many tokens only (``llama.Fp8Options.fused_min_rows``)
    fp8_fused_quantize_min_tokens: int = 0
    # An fp8 model's residual adds, RMSNorms and their outputs' per-token quantization in one
    # ``pallas_kernels.rms_norm_fp8`` kernel each (``llama.Fp8Options.fused_norm``)
    fp8_fused_norm: bool = False
    # Each bucket's model compiled once, apart from the sampler: a step is two calls, the forward of its
    # (tokens, pages) bucket, then the sampler variant's (``_SplitStep``). False: one executable a bucket and
    # variant, the model inlined into each of the four (XLA compiles the model, and every Pallas kernel in
    # it, once a variant: ``benchmarks/results/gpu_suite_h200.md``, fourteenth session). "except_greedy": the
    # greedy variant's steps one executable each (the model inlined, one call a step), the other variants' two
    # calls over one forward a bucket: the model compiled twice a bucket instead of four times, and greedy steps
    # as fast as with False.
    separate_sampler: bool | str = False
    # The KV pages' dtype: "auto" (the model's; f32 on the CPU for 16-bit models) or "fp8" / "fp8_e4m3"
    # (float8_e4m3fn, half the bytes: twice the pages in the same memory, and the decode kernel reads half
    # the bytes; ``jaxdyn.kv.cache``)
    kv_cache_dtype: str = "auto"
    # > 0: the attention kernels run this many programs, each looping over its items (the in-place decode
    # kernel's (sequence, kv head) pairs, the prefill kernel's real items: ``ragged_paged_attention``), so that a
    # bucket's empty sequence slots and padding items cost a loop iteration each rather than a program; 0: a
    # program an item (the tuned kernels as they were)
    attention_programs: int = 0
    # (tokens, sequence slots) pairs: a token bucket also compiled with fewer sequence slots than its own
    # (``seqs_for``), for steps whose rows fit them: the model's logits, the sampler and the attention kernels' grids
    # then cover those slots (a 2,048-token step of 1,024 slots with 461 live sequences, the ShareGPT-shaped run's
    # mean, computes the 128k-wide logits of 1,024 rows). Each pair is one more executable a sampler variant and
    # page bucket.
    seq_buckets: tuple[tuple[int, int], ...] = ()
    # the prefill attention kernel's programs alone (``ragged_paged_attention(prefill_programs=)``): > 0, that many
    # looping over the step's real items, so that a step's padding items (a decode-only step's every item) start no
    # program each; None: ``attention_programs``
    prefill_programs: int | None = None
    # the prefill attention kernel under a device-side condition: started only in steps with a prompt chunk of more
    # than one token (``ragged_paged_attention(skip_idle_prefill=True)``); a decode-only step starts none of its
    # programs. Off: it starts them and they find nothing to do.
    skip_idle_prefill: bool = False
    # q's and k's rotary embedding and the K/V write into the pages in one ``pallas_kernels.rope_kv`` kernel a layer
    # (``llama.AttentionOptions.fused_rope_kv``) instead of XLA's three (q's rotation, k's with its scatter, v's
    # scatter)
    fused_rope_kv: bool = False
    # fp8 KV pages: which of the decode attention kernel's products take e4m3 operands on the GPU's fp8 matrix
    # instructions (``DecodeBlockSizes.fp8_products``): "off" (the tiles widened to float16), "qk" (the scores: the
    # query quantized per head row), "qk_pv" (the values' product too: the probabilities in e4m3)
    attention_fp8_products: str = "off"
    # A step traces one decoder layer and inlines its jaxpr for every layer (``LlamaForCausalLM(nested_layers=True)``):
    # the warm-up's serial tracing about halved (``benchmarks/lowering_time.py``), the compiled step the same
    # (``benchmarks/nested_layers_check.py``). False: the layers traced one by one.
    nested_layers: bool = True
    # One executable a bucket for every sampler variant: the step picks its variant on the device, a
    # ``lax.switch`` over the four samplers on an index the host writes into the step's inputs, so warm-up
    # compiles the model (and its Pallas kernels) once a bucket instead of four times, and a step stays one call.
    # The branches filter and the ``full`` branch takes the top logprobs without a sort (``sample(sort_free=True)``): XLA sends
    # a vocabulary sort to CUB on a GPU, which its command buffers cannot hold, and a conditional they cannot hold
    # copies its index to the host, a synchronisation every step; a conditional whose branches hold only kernels
    # is recorded into the CUDA graph as conditional nodes (CONDITIONAL is among XLA's default command-buffer kinds
    # in both jaxlib versions: ``benchmarks.gpu.thunk_census.default_command_buffer_kinds``).
    # False: four executables a bucket, one a variant. "plain_full": the switch over ``plain`` and ``full`` only,
    # ``greedy`` and ``random`` their own executables (three a bucket): greedy and temperature-only steps the
    # same programs as with False, and only the steps that filter, penalise or take logprobs run the switch (8B
    # fp8 on an H100, top-p 0.95 offline: 0.994x False, cold start 83.4 s against 96.6 s in the same call,
    # ``benchmarks/results/gpu_suite_h200.md``, thirty-third session). None: "plain_full" on a GPU unless
    # ``separate_sampler`` splits the steps (the switch exists for XLA's command buffers there), False elsewhere (on
    # the CPU, the tests' reference, the switch's sort-free branches are jax.numpy searches: the demo's warm-up 326 s
    # with it against 192 s; a TPU's sort and search are unmeasured).
    sampler_switch: bool | str | None = None

    def __post_init__(self):
        # canonical, so that "fp8" and "fp8_e4m3" share compiled steps and cache entries
        object.__setattr__(self, "kv_cache_dtype", check_kv_cache_dtype(self.kv_cache_dtype))
        check_separate_sampler(self.separate_sampler)
        check_attention_programs(self.attention_programs)
        if self.prefill_programs is not None:
            check_attention_programs(self.prefill_programs, "prefill_programs")
        check_fp8_products(self.attention_fp8_products, self.kv_cache_dtype)
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError("max_num_seqs cannot exceed max_num_batched_tokens")
        check_sampler_switch(self.sampler_switch, self.separate_sampler)
        check_flag("nested_layers", self.nested_layers)
        check_flag("fp8_fused_norm", self.fp8_fused_norm)
        check_flag("fused_rope_kv", self.fused_rope_kv)
        if not is_count(self.fp8_kernel_max_tokens):
            raise ValueError(f"fp8_kernel_max_tokens: expected an integer >= 0, got {self.fp8_kernel_max_tokens!r}")
        if self.fp8_fused_quantize not in FUSED_QUANTIZE_SITES:
            raise ValueError(f"fp8_fused_quantize: expected off, o_proj or all, got {self.fp8_fused_quantize!r}")
        if not is_count(self.fp8_fused_quantize_min_tokens):
            raise ValueError("fp8_fused_quantize_min_tokens: expected an integer >= 0, got "
                             f"{self.fp8_fused_quantize_min_tokens!r}")
        object.__setattr__(self, "seq_buckets", check_seq_buckets(self.seq_buckets, self.buckets()[0],
                                                                  self.max_num_seqs))

    def buckets(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        max_pages = -(-self.max_model_len // self.page_size)
        tokens = token_buckets_for(self.token_buckets, self.max_num_batched_tokens)
        pages = self.page_buckets or powers_of_two(min(4, max_pages), max_pages)
        return tokens, tuple(sorted(pages))

    def seqs_for(self, token_bucket: int) -> int:
        return min(token_bucket, self.max_num_seqs)

    def seq_options(self, token_bucket: int) -> tuple[int, ...]:
        """The sequence slots a step of ``token_bucket`` may be compiled with, fewest first: its ``seq_buckets`` and
        its own (``seqs_for``), the last."""
        own = self.seqs_for(token_bucket)
        return tuple(sorted({s for t, s in self.seq_buckets if t == token_bucket and s < own})) + (own,)


SEPARATE_SAMPLER = (False, True, "except_greedy")


def check_fp8_products(value, kv_cache_dtype: str):
    """``value`` if it is an ``attention_fp8_products`` setting for pages of ``kv_cache_dtype`` (canonical):
    ValueError for another value, or for fp8 products without fp8 pages."""
    if value not in FP8_PRODUCTS:
        raise ValueError(f"attention_fp8_products: expected one of {', '.join(FP8_PRODUCTS)}, got {value!r}")
    if value != "off" and kv_cache_dtype != "fp8":
        raise ValueError(f"attention_fp8_products {value!r} needs kv_cache_dtype 'fp8'")
    return value


def check_attention_programs(value, name: str = "attention_programs"):
    """``value`` if it is an ``attention_programs`` (or ``name``) setting, an integer >= 0 (ValueError otherwise)."""
    if not is_count(value):
        raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    return value


def check_separate_sampler(value):
    """``value`` if it is a ``separate_sampler`` setting (ValueError naming the choices otherwise)."""
    if not any(value is v or (isinstance(v, str) and value == v) for v in SEPARATE_SAMPLER):
        raise ValueError(f"separate_sampler: expected False, True or 'except_greedy', got {value!r}")
    return value


def check_flag(name: str, value) -> None:
    """ValueError naming the option ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")


def check_sampler_switch(value, separate_sampler) -> None:
    """ValueError unless ``value`` is a ``sampler_switch`` setting that goes with ``separate_sampler``."""
    if not (value is None or isinstance(value, bool) or value == "plain_full"):
        raise ValueError(f"sampler_switch: expected true, false, 'plain_full' or none, got {value!r}")
    if value and separate_sampler:
        raise ValueError("sampler_switch and separate_sampler are two ways to compile the model once a bucket: "
                         "pick one")


def switched_variants(sampler_switch: bool | str | None, on_gpu: bool, separate_sampler: bool | str = False
                      ) -> tuple[str, ...]:
    """The sampler variants a ``sampler_switch`` setting puts into one switched executable a bucket, in the
    order of their branches (the index the host writes, ``ModelRunner._set_variant``); None: "plain_full" on a
    GPU whose steps ``separate_sampler`` does not split, none elsewhere."""
    if sampler_switch is None:
        sampler_switch = "plain_full" if on_gpu and not separate_sampler else False
    if sampler_switch == "plain_full":
        return (PLAIN, FULL)
    return VARIANTS if sampler_switch else ()


_PENALTIES, _FILTERS, _RANDOM, _LOGPROBS, _ALLOWED = 1, 2, 4, 8, 16    # what a row asks of the sampler


_TOP_K_OFF = 1 << 30


def sampling_row(sp: SamplingParams | None) -> tuple[tuple[float, ...], int, int]:
    """A row's constant sampler inputs: (its ``seqf`` row, top_k, the flags of what it asks).

    The same for every step of a request: the engine computes it once per request."""
    if sp is None:
        return (0.0, 1.0, 0.0, 1.0, 0.0, 0.0), 0, 0
    flags, top_k, top_p, min_p = 0, 0, 1.0, 0.0
    rep, pres, freq = 1.0, 0.0, 0.0
    if sp.temperature > 0:
        flags |= _RANDOM
        if sp.uses_filters:
            flags |= _FILTERS
            top_k, top_p, min_p = sp.top_k, sp.top_p, sp.min_p
            if top_k >= _TOP_K_OFF:            # keeps every token of any vocabulary: off (and fits int32)
                top_k = 0
    if sp.uses_penalties:
        flags |= _PENALTIES
        rep, pres, freq = sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty
    if sp.logprobs is not None:
        flags |= _LOGPROBS
    return (sp.temperature, top_p, min_p, rep, pres, freq), top_k, flags


@dataclasses.dataclass(slots=True)
class SequenceWork:
    """One sequence's share of a step: a prefill chunk or a single decode token."""

    token_ids: Sequence[int]   # tokens to compute now
    num_computed: int          # tokens of this sequence already in the cache
    page_ids: Sequence[int]    # its pages, covering num_computed + len(token_ids) tokens (list or i32 array)
    prev_row: int = -1         # >= 0: the last token is the previous step's sample of this row
    params: SamplingParams | None = None   # None: greedy
    prompt_len: int = 0        # for penalties: positions before this are the prompt
    seed: int = 0
    output_index: int = 0      # index in the output of the token this row draws
    banned: Sequence[int] = ()
    sampling_row: tuple | None = None      # sampling_row(params), when the caller keeps it
    logit_bias: Sequence[tuple[int, float]] = ()   # (token id, bias) pairs added to its logits
    allowed: Sequence[int] = ()   # distinct ids the row may only draw from (allowed_token_ids; () : any)
    # prompt_logprobs: the prompt tokens that follow positions score_at, score_at + 1, ... of this chunk; each is
    # scored (its raw logprob and the top ones) from that position's logits in a row of the step of its own
    scores: Sequence[int] = ()
    score_at: int = 0


@dataclasses.dataclass
class StepOutput:
    next_token_ids: np.ndarray          # i32[num_seqs] token drawn after each sequence's last token
    logprobs: np.ndarray | None = None  # f32[num_seqs] raw logprob of that token
    top_ids: np.ndarray | None = None   # i32[num_seqs, MAX_LOGPROBS + 1]: the last column the drawn token's rank
    top_logprobs: np.ndarray | None = None
    logits: np.ndarray | None = None    # f32[num_seqs, vocab] when RunnerConfig.return_logits
    # the step's scored prompt tokens (SequenceWork.scores), in the work's order: (f32[m] raw logprob of each,
    # i32[m, MAX_LOGPROBS + 1] top ids and its rank, f32[m, MAX_LOGPROBS] their logprobs); None when it scored none
    scores: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


class StepHandle:
    """A dispatched step; ``result()`` waits for it and copies what was asked to the host.
    ``variant`` names the sampler variant it ran with. ``sampled``: the draws buffer after the step's
    last call, its rows at ``offset``; ``parts``: each call's rows (``ModelRunner.plan``) and ``outs``
    its (logprobs, top ids, top logprobs, logits), in the call's own row order."""

    def __init__(self, runner, n, sampled, offset, parts, outs, want_logprobs, variant, scored: int = 0):
        self._runner, self.n, self.variant, self.scored = runner, n, variant, scored
        self._sampled, self._offset, self._parts, self._outs = sampled, offset, parts, outs
        self._want = want_logprobs
        self._out: StepOutput | None = None

    @property
    def num_calls(self) -> int:
        return len(self._parts)

    def result(self) -> StepOutput:
        if self._out is None:
            n = self.n
            out = StepOutput(np.asarray(self._sampled)[self._offset:self._offset + n])
            if self._want:
                out.logprobs, out.top_ids, out.top_logprobs = (self._gather(k) for k in range(3))
            if self._outs[0][3] is not None:
                out.logits = self._gather(3)
            if self.scored:               # one call (plan keeps such a step whole): its rows after the work's
                rows = slice(n, n + self.scored)
                out.scores = tuple(np.asarray(self._outs[0][k])[rows] for k in range(3))
            self._out = out
            self._runner._check_no_compile()
        return self._out

    def _gather(self, k: int) -> np.ndarray:
        """Output ``k`` of every call, as rows of the step."""
        if self._parts[0] is None:
            return np.asarray(self._outs[0][k])[:self.n]
        arrays = [np.asarray(o[k]) for o in self._outs]
        full = np.empty((self.n, *arrays[0].shape[1:]), arrays[0].dtype)
        for rows, a in zip(self._parts, arrays):
            full[rows] = a[:len(rows)]
        return full


def _splits(buckets: tuple[int, ...], single: int, costs: dict[int, float], max_calls: int = 4
            ) -> list[tuple[float, tuple[int, ...]]]:
    """Every multiset of 2 to ``max_calls`` buckets smaller than ``single``, as (summed cost, buckets
    largest first), cheapest first."""
    smaller = [b for b in buckets if b < single]
    out = []
    for k in range(2, max_calls + 1):
        for combo in itertools.combinations_with_replacement(sorted(smaller, reverse=True), k):
            out.append((sum(costs[b] for b in combo), combo))
    out.sort()
    return out


def _place(ns: Sequence[int], buckets: tuple[int, ...], max_seqs: int) -> list[list[int]] | None:
    """The rows of each of ``buckets`` (largest first) that hold rows of ``ns`` tokens: rows of several
    tokens first, largest first, each in the first bucket with room; single tokens then fill the buckets in
    row order. None if they do not fit; buckets left empty are dropped."""
    room = list(buckets)
    seats = [min(b, max_seqs) for b in buckets]
    rows: list[list[int]] = [[] for _ in buckets]
    for i in sorted((i for i, n in enumerate(ns) if n > 1), key=lambda i: -ns[i]):
        n = ns[i]
        for j in range(len(room)):
            if room[j] >= n and seats[j]:
                room[j] -= n
                seats[j] -= 1
                rows[j].append(i)
                break
        else:
            return None
    singles = [i for i, n in enumerate(ns) if n == 1]
    k = 0
    for j in range(len(room)):
        take = min(room[j], seats[j], len(singles) - k)
        rows[j] += singles[k:k + take]
        k += take
    if k < len(singles):
        return None
    return [sorted(r) for r in rows if r]


def kv_cache_dtype(weight_dtype, mesh: Mesh, requested: str = "auto"):
    """The KV pages' dtype: fp8 (float8_e4m3fn) when ``requested`` is "fp8" / "fp8_e4m3"; for "auto" the
    weights', except 16-bit floats on the CPU, which are kept in f32.

    XLA's CPU backend has no native bf16 scatter or gather: it converts the whole operand (the
    cache) to f32 and back around each, so every step costs time in the size of the pool (measured:
    demo model, one sequence, 98 ms a step with 256 pages, 536 ms with 4096). Keys and values are
    computed in the weights' dtype and widened exactly, and attention reads them in f32 anyway, so
    the results are the same. GPUs keep 16-bit pages (the kernels read them at half the bytes).
    """
    if check_kv_cache_dtype(requested) != "auto":
        return FP8_KV_DTYPE
    dt = jnp.dtype(weight_dtype)
    if dt.itemsize == 2 and jnp.issubdtype(dt, jnp.floating) and mesh.devices.flat[0].platform == "cpu":
        return jnp.dtype(jnp.float32)
    return dt


def _key_fields(key: tuple) -> tuple[str, int, int, str | None, int | None]:
    """(kind, tokens, pages, sampler variant or None, slots or None) of a compiled part's key (``_part_keys``): the
    slots end a key only where they are one of its bucket's ``seq_buckets``."""
    kind, t, p, *rest = key
    s = rest.pop() if rest and not isinstance(rest[-1], str) else None
    return kind, t, p, (rest[0] if rest else None), s


def _cache_name(key: tuple) -> str:
    """The executable cache's name of a compiled part (``ModelRunner._part_keys``)."""
    kind, t, p, *rest = key
    return f"{kind}-t{t}-p{p}" + "".join(f"-{v}" if isinstance(v, str) else f"-s{v}" for v in rest)


class _SplitStep:
    """A step as two compiled calls (``RunnerConfig.separate_sampler``): the bucket's forward (KV cache, token
    pages, logits), then its sampler variant's (draws, logprobs); called as one compiled step is, with the same
    outputs. The three host buffers are moved to the device once (one ``device_put`` of the three), and both
    calls take them there: one transfer a step, as with one call (each call moving them from the host cost
    0.16-0.38 ms more a step on the CPU). The forward returns none of them: an output that passes an input
    through is a copy into a buffer allocated afresh every call, and on an H200 those moving addresses made XLA
    update the forward's CUDA graph, 3.7-7.5 ms of host time a call against 1.0-1.9 ms without them
    (``benchmarks/results/gpu_suite_h200.md``, eighteenth session). The token pages pass through both calls
    donated; the logits are the forward's output and the sampler's input (which returns them too with
    ``return_logits``): a float32 buffer a bucket donated to both calls ran slower on an H200 (0.915x one
    executable against 0.969x) and held 2.2 GB."""

    def __init__(self, forward, sample, sharding):
        self.forward, self.sample, self.sharding = forward, sample, sharding

    def as_text(self) -> str:
        """Both executables' HLO, the forward's first (as ``jax.stages.Compiled.as_text``)."""
        return self.forward.as_text() + "\n" + self.sample.as_text()

    def __call__(self, state, kv_cache, token_pages, prev_sampled, tok, seqi, seqf):
        tok, seqi, seqf = jax.device_put((tok, seqi, seqf), self.sharding)
        kv_cache, token_pages, logits = self.forward(state, kv_cache, token_pages, prev_sampled, tok, seqi, seqf)
        token_pages, sampled, lps, top_ids, top_lps, *copy = self.sample(
            token_pages, prev_sampled, logits, tok, seqi, seqf)
        return kv_cache, token_pages, sampled, lps, top_ids, top_lps, copy[0] if copy else None


def _pick(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what}={n} exceeds the largest bucket {buckets[-1]}")


def gpu_memory_stats(mesh: Mesh) -> dict:
    """The memory stats (JAX's ``memory_stats``) of a GPU mesh's first device, else empty: a mesh's devices hold
    like shards of the weights and pages, so the first stands for all."""
    dev = mesh.devices.flat[0]
    return (dev.memory_stats() or {}) if dev.platform == "gpu" else {}


class ModelRunner:
    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, mesh: Mesh, config: RunnerConfig):
        self.graphdef = graphdef
        # The weights as the flat tuple of their leaves, the step's first argument (unflattened
        # inside it): flattening the nnx.State runs a Python callback per Variable on every call
        # (measured, CPU, 291 leaves of the 8B shape: 1.7 ms a call with the State, 0.5 ms flat).
        # ``state`` may be abstract (``ShapeDtypeStruct`` leaves, ``checkpoints.loader.plan_model``): the steps
        # compile against shapes alone, and ``set_weights`` gives the arrays before the first step.
        path_leaves, self.state_treedef = jax.tree_util.tree_flatten_with_path(state)
        self.state = tuple(leaf for _, leaf in path_leaves)
        self._state_names = tuple(jax.tree_util.keystr(path) for path, _ in path_leaves)
        self.weights_loaded = all(isinstance(leaf, jax.Array) for leaf in self.state)
        self._state_shardings = tuple(jax.tree.leaves(param_shardings(state, mesh)))
        self.mesh = mesh
        self.config = config
        model = nnx.merge(graphdef, state)
        model_cfg = model.config
        self.model_config = model_cfg
        self.kv_spec = KVCacheSpec(
            num_layers=model_cfg.num_layers,
            num_kv_heads=stored_kv_heads(model_cfg.num_kv_heads, model_parallel_size(mesh)),
            num_pages=config.num_pages,
            page_size=config.page_size,
            head_dim=model_cfg.head_dim,
            dtype=kv_cache_dtype(jax.tree.leaves(state)[0].dtype, mesh, config.kv_cache_dtype),
        )
        self._replicated = replicated(mesh)
        # A runner built on an abstract state compiles against the pages' shapes and allocates them once its
        # weights are in and its steps compiled (``allocate_kv``): the buffers loading and compiling take for a
        # while (a generator's, XLA's autotuning) are gone by then. Session 46: the 8B engine's default pages,
        # allocated first, left too little of an H100 for those and the build ran out of memory.
        self.kv_cache = (allocate_kv_cache(self.kv_spec, mesh) if self.weights_loaded
                         else abstract_kv_cache(self.kv_spec, mesh))
        self._part_needs: dict[tuple, tuple[int, int] | None] = {}     # ``step_memory_need``'s, by part key
        self.token_pages = jax.device_put(
            np.zeros((config.num_pages, config.page_size), np.int32), self._replicated)
        self.token_buckets, self.page_buckets = config.buckets()
        # each token bucket's sequence slots, fewest first (``seq_options``), which ``_pack`` picks from every step
        self._seq_options = {t: config.seq_options(t) for t in self.token_buckets}
        self.max_rows = config.max_num_seqs
        # The tokens steps draw, two halves: a step writes one (``_write_half``) while its inputs read the
        # previous step's draws from the other, so the calls of a split step can share one buffer.
        self.prev_sampled = jax.device_put(np.zeros(2 * self.max_rows, np.int32), self._replicated)
        self._write_half = 0
        # token bucket -> seconds a step of it costs run back to back (``measure_step_costs``); None: no splits
        self.step_costs: dict[int, float] | None = None
        self._plans: dict[int, list[tuple[float, tuple[int, ...]]]] = {}
        # what the steps ran: their real tokens, the bucket rows those filled (tokens / rows: the share that
        # was not padding), their compiled calls (more than the steps where steps were split)
        self.tokens_run = self.rows_run = self.calls_run = 0
        # host seconds inside the compiled steps' calls (their dispatch: argument handling, the inputs' transfer,
        # launching the graph, and whatever the call waits for before it returns)
        self.call_seconds = 0.0
        # (tokens, pages, variant), and the slots last where they are one of the ``seq_buckets``
        self._compiled: dict[tuple, jax.stages.Compiled] = {}
        self._copy_compiled = None
        self._compiles_at_warmup: int | None = None
        self._warmup_started: float | None = None   # when load_weights began compiling (warmup's start)
        # Compilations on the calling thread inside this runner's own calls after warm-up: other
        # engines of the process (disaggregation, tests) compiling on other threads do not count.
        self.compiles_while_serving = 0
        self.executables_loaded = 0        # compiled parts (``_part_keys``) warm-up took from the executable cache
        # seconds each part warm-up lowered and compiled took (``compile_summary``): part key -> [lower s, compile s]
        self.compile_seconds: dict[tuple, list[float]] = {}
        self._compile_wall: float | None = None
        self._compiles_reported = 0
        self._forward_fn = self._forward_body()
        self._forward = jax.jit(self._forward_fn)
        self._jitted = {v: self._make_jitted(v) for v in VARIANTS}
        # the variants ("switch", t, p) serves (``sampler_switch``, by device when None)
        self._switch = switched_variants(config.sampler_switch, self.on_gpu, config.separate_sampler)
        if self._switch:
            self._switched = self._make_switched(self._switch)
        # compiled parts (``_part_keys``): whole steps, or forwards and samplers (``separate_sampler``)
        self._parts: dict[tuple, jax.stages.Compiled] = {}
        if config.separate_sampler:
            self._forward_step = self._make_forward_step()
            self._sample_steps = {v: self._make_sample_step(v) for v in VARIANTS if self._split(v)}
        self._copy_jitted = self._make_copy()

    # ---- compilation -------------------------------------------------------------------------

    def _kv_shardings(self):
        kv_sharding = jax.sharding.NamedSharding(
            self.mesh, kv_cache_partition_spec(self.mesh, self.kv_spec.num_kv_heads))
        return [(kv_sharding, kv_sharding)] * self.kv_spec.num_layers

    def _forward_body(self):
        """The model's part of the step (inputs unpacked, token ids written, forward, logits). Jitted once
        (``_forward``) and shared by every sampler variant's step: a nested jit is traced once per shape and
        its jaxpr reused by the other variants' steps (tracing the unrolled 32-layer model is most
        of a warm start's lowering), and XLA inlines it, so the executables are unchanged; with
        ``separate_sampler`` also an executable of its own (``_make_forward_step``)."""
        graphdef, state_treedef = self.graphdef, self.state_treedef
        options = dict(attention_in_place=self.config.attention_in_place,
                       fp8_kernel_rows=self.config.fp8_kernel_max_tokens,
                       fp8_fused_quantize=self.config.fp8_fused_quantize,
                       fp8_fused_min_rows=self.config.fp8_fused_quantize_min_tokens,
                       fp8_fused_norm=self.config.fp8_fused_norm,
                       attention_programs=self.config.attention_programs,
                       prefill_programs=self.config.prefill_programs,
                       skip_idle_prefill=self.config.skip_idle_prefill,
                       fused_rope_kv=self.config.fused_rope_kv,
                       attention_fp8_products=self.config.attention_fp8_products,
                       nested_layers=self.config.nested_layers)

        def forward(state_leaves, kv_cache, token_pages, prev_sampled, tok, seqi, seqf):
            state = jax.tree.unflatten(state_treedef, state_leaves)
            md, token_ids_host, token_src, logits_rows, _, _ = _unpack(tok, seqi, seqf)
            token_ids = jnp.where(token_src >= 0, prev_sampled[jnp.maximum(token_src, 0)], token_ids_host)
            token_pages = token_pages.at[md.slot_page, md.slot_offset].set(token_ids, mode="drop", unique_indices=True)
            model = nnx.merge(graphdef, state)
            kv_cache, hidden = model(kv_cache, token_ids, md, **options)
            return kv_cache, token_pages, model.compute_logits(hidden[logits_rows])   # f32[S, vocab]

        return forward

    def _make_forward_step(self):
        """The forward as an executable of its own (``separate_sampler``): the KV cache and token pages
        donated; returns them and the logits (``_SplitStep``). Its three input buffers come on the device
        (``_SplitStep`` moves them once for both calls); it returns none of them: an output that passes an
        input through is a copy into a buffer allocated afresh every call."""
        kv, rep = self._kv_shardings(), self._replicated
        return jax.jit(self._forward_fn, in_shardings=(self._state_shardings, kv, rep, rep, rep, rep, rep),
                       out_shardings=(kv, rep, rep), donate_argnums=(1, 2))

    def _sample_fn(self, variant: str, sort_free: bool | None = None):
        """The sampler's part of a step: draws of ``logits`` into ``prev_sampled``'s rows this step writes
        (``sort_free``: ``sample``'s)."""
        page_size = self.config.page_size

        def sample_step(token_pages, prev_sampled, logits, tok, seqi, seqf):
            md, _, _, _, sp, out_rows = _unpack(tok, seqi, seqf)
            S, P = md.page_table.shape

            def history():
                h = token_pages[md.page_table].reshape(S, P * page_size)
                pos = jnp.arange(P * page_size)[None, :]
                return h, pos < md.kv_lens[:, None], pos >= sp.prompt_lens[:, None]

            ids, lps, top_ids, top_lps = sample(logits, history, sp, variant, sort_free=sort_free)
            # into the half of the buffer this step writes (the other half holds the previous step's
            # draws, which this step's inputs read); padding rows go nowhere
            return prev_sampled.at[out_rows].set(ids, mode="drop"), lps, top_ids, top_lps

        return sample_step

    def _make_sample_step(self, variant: str):
        """The sampler as an executable of its own (``separate_sampler``). It takes the token pages donated
        and returns them (aliased, no copy), for the next step's forward to donate: a buffer one executable
        reads and the next donates is never read by a third in between (``_SplitStep``). With
        ``return_logits`` it also returns the logits (a copy: an input passed through)."""
        rep = self._replicated
        sample_step = self._sample_fn(variant)
        copy = self.config.return_logits

        def sample_and_pass(token_pages, prev_sampled, logits, *rest):
            out = (token_pages, *sample_step(token_pages, prev_sampled, logits, *rest))
            return (*out, logits) if copy else out

        return jax.jit(sample_and_pass, in_shardings=(rep,) * 6, out_shardings=(rep,) * (6 if copy else 5),
                       donate_argnums=(0,))

    def _whole_step(self, sample, gather_logits: bool = False):
        """The jitted step of one executable: the model (``_forward``), then ``sample(token_pages, prev_sampled,
        logits, tok, seqi, seqf) -> (draws, logprobs, top ids, top logprobs)``; the KV cache and token pages donated.
        ``gather_logits``: the logits replicated first (tensor parallelism splits them by vocabulary)."""
        # locals, not self: the jitted step is kept on the runner, and a closure over self would be a reference cycle
        # (a frozen heap frees an engine by reference counting alone: test_a_settled_engine_is_freed_when_dropped)
        return_logits, forward, replicated = self.config.return_logits, self._forward, self._replicated

        def step(state_leaves, kv_cache, token_pages, prev_sampled, tok, seqi, seqf):
            kv_cache, token_pages, logits = forward(state_leaves, kv_cache, token_pages, prev_sampled,
                                                    tok, seqi, seqf)
            if gather_logits:
                logits = jax.lax.with_sharding_constraint(logits, replicated)
            sampled, lps, top_ids, top_lps = sample(token_pages, prev_sampled, logits, tok, seqi, seqf)
            return (kv_cache, token_pages, sampled, lps, top_ids, top_lps,
                    logits if return_logits else None)

        kv = self._kv_shardings()
        rep = self._replicated
        return jax.jit(
            step,
            in_shardings=(self._state_shardings, kv, rep, rep, rep, rep, rep),
            out_shardings=(kv, rep, rep, rep, rep, rep, rep),
            donate_argnums=(1, 2),
        )

    def _make_jitted(self, variant: str):
        # with tensor parallelism the sampled variants gather the logits (split by vocabulary) once, first: their
        # penalties' scatters, the filters' passes (Pallas calls, which XLA does not partition) and the draw then
        # run on whole rows, not as collectives; greedy's argmax reduces the split rows as they are
        gather = model_parallel_size(self.mesh) > 1 and variant != VARIANTS[0]
        return self._whole_step(self._sample_fn(variant), gather_logits=gather)

    def _make_switched(self, variants: tuple[str, ...]):
        """The step of the sampler ``variants`` as one executable (``sampler_switch``): the model, then a
        ``lax.switch`` over their samplers on ``seqi[S, 0]`` (the index in ``variants`` the host wrote,
        ``_set_variant``). Each branch returns the draws and the logprob outputs (zeros where its variant has none)."""
        k = MAX_LOGPROBS

        def branch(fn):
            def run(token_pages, prev_sampled, logits, tok, seqi, seqf):
                sampled, lps, top_ids, top_lps = fn(token_pages, prev_sampled, logits, tok, seqi, seqf)
                if lps is None:     # zeros that are a kernel, not a memset, which would keep the switch out of the graph
                    rows, anchor = seqf.shape[0], seqi[0, 1]          # cu_q_lens[0]: 0
                    lps, top_ids, top_lps = (kernel_zeros((rows,), jnp.float32, anchor),
                                             kernel_zeros((rows, k + 1), jnp.int32, anchor),
                                             kernel_zeros((rows, k), jnp.float32, anchor))
                return sampled, lps, top_ids, top_lps
            return run

        branches = [branch(self._sample_fn(v, sort_free=True)) for v in variants]

        def sample(token_pages, prev_sampled, logits, tok, seqi, seqf):
            index = jnp.clip(seqi[seqf.shape[0], 0], 0, len(variants) - 1)
            # The branches read and write only buffers of the step's own (copies in and out): the step's inputs and
            # outputs are at new addresses every call, and XLA re-records a recorded conditional's every branch
            # when a buffer one of them uses moved, where the tree re-records only the commands that use it (read
            # in XLA's source, GpuCommandBuffer::UpdateCase; not yet measured on a GPU: dispatch_probe --runner).
            anchor = seqi[0, 1]                                   # cu_q_lens[0]: 0
            moved = (prev_sampled, tok, seqi, seqf)
            prev_sampled, tok, seqi, seqf = (step_copy(x, anchor) for x in moved)
            out = lax.switch(index, branches, token_pages, prev_sampled, logits, tok, seqi, seqf)
            return tuple(step_copy(x, anchor) for x in out)

        # tensor parallel: the logits split by vocabulary would make every reduction of the samplers a collective
        # inside the branches (about 80 in the sort-free full branch), and a collective is not one of XLA's default
        # command types, so the conditional would leave the CUDA graph; one all-gather before the switch instead
        return self._whole_step(sample, gather_logits=model_parallel_size(self.mesh) > 1)

    def _make_copy(self):
        def copy(kv_cache, token_pages, src, dst):
            new = []
            for k, v in kv_cache:
                new.append((k.at[:, dst].set(k[:, src], mode="drop"),
                            v.at[:, dst].set(v[:, src], mode="drop")))
            return new, token_pages.at[dst].set(token_pages[src], mode="drop")

        kv, rep = self._kv_shardings(), self._replicated
        return jax.jit(copy, in_shardings=(kv, rep, rep, rep), out_shardings=(kv, rep),
                       donate_argnums=(0, 1))

    def bucket_shapes(self) -> list[tuple[int, int, int]]:
        """Every (tokens, seqs, pages) shape warm-up compiles: each token bucket with its own sequence slots, then
        the ``seq_buckets``."""
        own = [(t, self.config.seqs_for(t), p) for t in self.token_buckets for p in self.page_buckets]
        return own + [(t, s, p) for t, s in self.config.seq_buckets for p in self.page_buckets]

    def _fewer_seqs(self, t: int, s: int) -> int | None:
        """``s`` where it is one of token bucket ``t``'s ``seq_buckets`` (fewer slots than its own), else None: a
        step's key (``_compile``) and its parts' (``_part_keys``) carry ``s`` only then."""
        return None if s == self.config.seqs_for(t) else s

    @property
    def on_cpu(self) -> bool:
        """Whether the runner's devices are the CPU's (the defaults that differ on accelerators ask this)."""
        return self.mesh.devices.flat[0].platform == "cpu"

    @property
    def on_gpu(self) -> bool:
        """Whether the runner's devices are GPUs (``sampler_switch``'s default asks this)."""
        return self.mesh.devices.flat[0].platform == "gpu"

    def warmup_threads(self) -> int:
        n = self.config.warmup_threads
        if n is None:
            n = 1 if self.on_cpu else min(8, (os.cpu_count() or 2) // 2)
        return max(1, n)

    def set_weights(self, state) -> None:
        """The weights of a runner built on an abstract state: the same tree of arrays, each in the shape,
        dtype and sharding the steps were compiled for (ValueError naming the first that is not); then its KV
        pages (``allocate_kv``)."""
        self._take_weights(state)
        self.allocate_kv()

    def _take_weights(self, state) -> None:
        """``set_weights``' check and hand-over of the weights, the pages left as they are."""
        leaves, treedef = jax.tree.flatten(state)
        if treedef != self.state_treedef:
            raise ValueError("weights of another structure than the runner's model")
        for name, new, old, sharding in zip(self._state_names, leaves, self.state, self._state_shardings):
            if not isinstance(new, jax.Array):
                raise ValueError(f"weight {name}: {type(new).__name__}, not an array")
            if new.shape != old.shape or new.dtype != old.dtype:
                raise ValueError(f"weight {name}: {new.dtype}{list(new.shape)}, the model's is "
                                 f"{old.dtype}{list(old.shape)}")
            if not new.sharding.is_equivalent_to(sharding, new.ndim):
                raise ValueError(f"weight {name}: sharded as {new.sharding}, the steps take {sharding}")
        self.state = tuple(leaves)
        self.weights_loaded = True

    @property
    def kv_allocated(self) -> bool:
        return isinstance(self.kv_cache[0][0], jax.Array)

    def allocate_kv(self) -> None:
        """The KV pages of a runner built on an abstract state, allocated (``set_weights`` calls it, or
        ``load_weights`` once its steps are compiled), then checked against what the compiled steps allocate as
        they run (``check_step_room``)."""
        if self.kv_allocated:
            return
        self.kv_cache = allocate_kv_cache(self.kv_spec, self.mesh)
        self.check_step_room()

    def step_memory_need(self) -> int | None:
        """The most bytes one compiled step allocates per device as it runs besides its arguments, over the steps
        compiled so far, from XLA's buffer assignment of its parts: a part's temporaries and its outputs not
        aliased to a donated input; a step of two calls (``separate_sampler``) holds the forward's outputs (the
        logits) while its sampler runs. None where no executable reports it. A floor: the outputs of a step still
        in flight and the page copy's and KV transfers' executables are not counted."""
        def analysis(key):      # once a part (each step of a bucket shares its forward): (need, outputs held)
            if key not in self._part_needs:
                try:
                    m = self._parts[key].memory_analysis()
                except Exception:  # noqa: BLE001 -- an executable without the analysis: nothing known of it
                    m = None
                out = 0 if m is None else max(m.output_size_in_bytes - m.alias_size_in_bytes, 0)
                self._part_needs[key] = None if m is None else (m.temp_size_in_bytes + out, out)
            return self._part_needs[key]

        needs = []
        for step in self._compiled:
            held = 0
            for key in self._part_keys(*step):
                a = analysis(key)
                if a is None:
                    break
                needs.append(held + a[0])
                held += a[1]
        return max(needs) if needs else None

    def _memory_stats(self) -> dict:
        return gpu_memory_stats(self.mesh)

    def check_step_room(self) -> None:
        """On a GPU, ValueError naming the sizes when the device's memory left beside the weights and the pages is
        less than the largest compiled step allocates as it runs (its first run would fail for memory)."""
        stats = self._memory_stats()
        need = self.step_memory_need()
        if "bytes_limit" not in stats or need is None:
            return
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        if need > free:
            gib = 2 ** 30
            raise ValueError(f"the KV cache's {self.config.num_pages} pages leave {free / gib:.2f} GiB of the device's "
                             f"{stats['bytes_limit'] / gib:.2f} GiB limit, and the largest compiled step allocates "
                             f"{need / gib:.2f} GiB as it runs: use fewer pages (num_pages), a larger memory share "
                             "(gpu_memory_utilization) or fewer tokens per step (max_num_batched_tokens)")

    def load_weights(self, load: Callable[[], Any], compile_steps: bool = True, progress: bool = False) -> Any:
        """``set_weights(load().state)`` where ``load`` returns an object with the weights as ``.state`` (a
        ``LoadedModel``), which it returns; with ``compile_steps``, every step is compiled (``warmup``'s
        compilation) on another thread meanwhile: a step's compilation needs the weights' shapes only, and
        loading is mostly reading files or the host's work. If ``load`` raises, the compiling thread stops
        after the step it is compiling, and the error propagates once it has (a process that exits while
        XLA compiles on another thread aborts)."""
        if not compile_steps:
            loaded = load()
            self.set_weights(loaded.state)
            return loaded
        cancel = threading.Event()
        outcome: dict[str, BaseException] = {}

        def compile_all():
            try:
                self._compile_steps(progress, cancel)
            except BaseException as e:  # noqa: BLE001 -- raised on the loading thread
                outcome["error"] = e

        thread = threading.Thread(target=compile_all, name="jaxdyn-compile-while-loading", daemon=True)
        t0 = time.perf_counter()
        thread.start()
        try:
            loaded = load()
            self._take_weights(loaded.state)
        except BaseException:
            cancel.set()
            thread.join()
            raise
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        self.allocate_kv()          # the pages after the loading's and compiling's transient buffers are gone
        self._warmup_started = t0
        return loaded

    def warmup(self, progress: bool = False) -> float:
        """Compile every bucket in every sampler variant, then measure the step costs; returns the seconds it
        took (from the start of ``load_weights``' compiling, when that ran).

        Steps are traced and lowered one after another on this thread (tracing holds the GIL;
        the variants of one shape share the model's trace, see ``_forward_body``), and each is
        handed to a compiling thread as soon as it is lowered, so compilation (or, with JAX's
        persistent cache warm, loading) overlaps the lowering of the next. Every step is compiled
        on ``warmup_threads()`` threads at once (each compilation runs in XLA without the GIL).
        ``first_compiles_alone=True``: the first variant of each (tokens, pages) shape is compiled
        alone, one after another, so XLA autotunes that shape's matrix products with the GPU to
        itself (its process-wide autotuning cache then serves the other variants), and the other
        variants on the threads after those are done.

        With ``executable_cache_dir``, steps saved there by an earlier run of the same fingerprint are
        loaded instead (no tracing, lowering or compiling), and the ones compiled here are saved."""
        t0 = self._warmup_started or time.perf_counter()
        self._warmup_started = None
        if not self.weights_loaded:
            raise RuntimeError("the runner has no weights yet (set_weights)")
        self._compile_steps(progress)
        self._compile_copy()
        if self.kv_allocated:
            self.check_step_room()
        else:               # a load whose compiling failed after the weights came: the pages were never allocated
            self.allocate_kv()
        if self.split_enabled() and len(self.token_buckets) > 1:
            self.measure_step_costs()
        self._compiles_at_warmup = compilation_count()
        return time.perf_counter() - t0

    def _compile_steps(self, progress: bool = False, cancel: threading.Event | None = None) -> float:
        """``warmup``'s compilation (``cancel``: stop after the steps being compiled); returns its seconds."""
        from tqdm.auto import tqdm
        t0 = time.perf_counter()
        stopped = cancel.is_set if cancel is not None else (lambda: False)
        users = self._part_users()
        keys = [k for k in users if k not in self._parts]

        def assemble(key):
            # a step is ready (``_compiled``) as soon as its last part is
            for s in users[key]:
                if s not in self._compiled and all(k in self._parts for k in self._part_keys(*s)):
                    self._compiled[s] = self._assemble(*s)

        bar = tqdm(total=len(keys), desc="warm-up (compiling buckets)", disable=not progress or not keys)
        cache = self.executable_cache()
        threads = self.warmup_threads()
        if cache is not None and keys:
            # loading is mostly XLA's (GIL released): on threads as compiling is (8B, H200: ~0.5 s a step alone)
            with concurrent.futures.ThreadPoolExecutor(threads, "jaxdyn-warmup-load") as pool:
                for key, compiled in zip(keys, pool.map(lambda k: cache.load(_cache_name(k)), keys)):
                    if compiled is not None:
                        self._parts[key] = compiled
                        assemble(key)
                        self.executables_loaded += 1
                        bar.update()
            keys = [k for k in keys if k not in self._parts]

        def lower(key):
            t = time.perf_counter()
            lowered = self._lower_part(key)
            self.compile_seconds[key] = [time.perf_counter() - t, 0.0]
            return lowered

        def compile_part(lowered, key):
            # on a warm-up thread: XLA's seconds for this part (with JAX's persistent cache warm, its load)
            t = time.perf_counter()
            compiled = self.compile(lowered, key[1])
            self.compile_seconds[key][1] = time.perf_counter() - t
            return compiled

        t_compile = time.perf_counter()      # compile_summary's wall: what the cache did not serve

        def done(key, compiled):
            # saved as each step is compiled, while the next compiles (serialising takes the GIL in part)
            self._parts[key] = compiled
            assemble(key)
            if cache is not None:
                cache.save(_cache_name(key), compiled)
            bar.update()

        def finish(futures: dict) -> None:
            for fut in concurrent.futures.as_completed(futures):
                if stopped():
                    for f in futures:
                        f.cancel()
                    return
                done(futures[fut], fut.result())

        if threads == 1:
            for key in keys:
                if stopped():
                    break
                done(key, compile_part(lower(key), key))
        elif not self.config.first_compiles_alone:
            with concurrent.futures.ThreadPoolExecutor(threads, "jaxdyn-warmup") as pool:
                finish({pool.submit(compile_part, lower(key), key): key for key in keys if not stopped()})
        else:
            def shape(key):     # (tokens, pages, slots: None for the bucket's own)
                _, t, p, _, s = _key_fields(key)
                return t, p, s

            first_of_shape: dict[tuple, tuple] = {}
            for key in keys:
                first_of_shape.setdefault(shape(key), key)
            alone = list(first_of_shape.values())
            rest = [k for k in keys if first_of_shape[shape(k)] != k]
            with (concurrent.futures.ThreadPoolExecutor(1, "jaxdyn-warmup-first") as first_pool,
                  concurrent.futures.ThreadPoolExecutor(threads, "jaxdyn-warmup") as pool):
                firsts = {first_pool.submit(compile_part, lower(key), key): key for key in alone if not stopped()}
                lowered = [(key, lower(key)) for key in rest if not stopped()]
                finish(firsts)
                if not stopped():
                    finish({pool.submit(compile_part, lo, key): key for key, lo in lowered})
        bar.close()
        if keys:
            self._compile_wall = time.perf_counter() - t_compile
        return time.perf_counter() - t0

    def compile_summary(self) -> dict | None:
        """What warm-up's compilation cost (None when it compiled nothing): ``parts`` compiled, ``threads``,
        ``wall_s`` (warm-up's compiling, after any loads from the executable cache), ``lower_s`` (tracing and lowering, on the
        calling thread, summed), ``compile_s`` (XLA's compile calls on the warm-up threads, summed: with
        ``wall_s`` it says how busy the threads were), ``compile_max_s`` and ``slowest`` (that part's key),
        ``by_tokens`` (compile seconds summed by token bucket). Where JAX's persistent cache served a part, its
        compile seconds are that load's."""
        done = {k: v for k, v in self.compile_seconds.items() if v[1] > 0}
        if not done or self._compile_wall is None:
            return None
        slowest = max(done, key=lambda k: done[k][1])
        by_tokens: dict[int, float] = {}
        for k, (_, c) in done.items():
            by_tokens[k[1]] = by_tokens.get(k[1], 0.0) + c
        return {"parts": len(done), "threads": self.warmup_threads(), "wall_s": round(self._compile_wall, 2),
                "lower_s": round(sum(v[0] for v in done.values()), 2),
                "compile_s": round(sum(v[1] for v in done.values()), 2),
                "compile_max_s": round(done[slowest][1], 2), "slowest": slowest,
                "by_tokens": {t: round(c, 2) for t, c in sorted(by_tokens.items())}}

    def split_enabled(self) -> bool:
        if self.config.split_steps is None:
            return not self.on_cpu
        return self.config.split_steps

    def measure_step_costs(self, reps: int = 4, rounds: int = 2) -> dict[int, float]:
        """Seconds a step of each token bucket costs with steps dispatched back to back (the device's time, or
        the host's call where that is longer), the least of ``rounds`` runs of ``reps`` steps; sets
        ``step_costs``. The steps hold only padding: their matrix products are a full step's, their
        attention costs nothing, and a split does not change what attention reads. Their token ids are
        random (a GPU's matrix products run slower on varied data than on one repeated row: more power).
        Each bucket runs with the narrowest page table and the greedy sampler. A round runs every bucket, and a
        first untimed round warms them all up: timed bucket by bucket instead, the first bucket's runs came
        while the GPU's clocks were still rising (an H100's 16-token step measured 4.5-6.3 ms from one process
        to the next, the 64-token one 4.4-4.9 ms)."""
        p = self.page_buckets[0]
        steps = [(t, self._compile(t, p, VARIANTS[0]), jax.device_put(self._padding_arrays(t, p), self._replicated))
                 for t in self.token_buckets]
        costs = {t: float("inf") for t in self.token_buckets}
        for r in range(rounds + 1):               # the first round warms up
            for t, compiled, args in steps:
                sampled = self.prev_sampled
                t0 = time.perf_counter()
                for _ in range(reps):
                    self.kv_cache, self.token_pages, sampled, *_ = compiled(
                        self.state, self.kv_cache, self.token_pages, sampled, *args)
                sampled.block_until_ready()
                if r:
                    costs[t] = min(costs[t], (time.perf_counter() - t0) / reps)
        self.set_step_costs(costs)
        return costs

    def set_step_costs(self, costs: dict[int, float] | None) -> None:
        """Seconds a step of each token bucket costs (what ``plan`` weighs); None: steps are never split."""
        if costs is not None and set(costs) != set(self.token_buckets):
            raise ValueError(f"step costs for buckets {sorted(costs)}, the runner has {list(self.token_buckets)}")
        self.step_costs = costs
        self._plans = {}

    def _padding_arrays(self, t: int, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The inputs of a step of bucket (t, p) that holds no tokens: nothing is written or drawn."""
        s = self.config.seqs_for(t)
        tok = np.zeros((_TOK_ROWS, t), np.int32)
        tok[0] = np.random.default_rng(t).integers(0, self.model_config.vocab_size, t)
        tok[1] = -1
        tok[3] = self.config.num_pages                   # every slot out of range: dropped
        seqi = np.zeros((s + 1, _SEQ_COLS + p + _BIAS_COLS), np.int32)
        seqi[:, 7] = 2 * self.max_rows                   # no draw kept
        seqi[:, _SEQ_COLS + p:_SEQ_COLS + p + MAX_BANNED] = -1
        seqf = np.zeros((s, _SEQF_COLS), np.float32)
        seqf[:, 1] = seqf[:, 3] = 1.0
        return tok, seqi, seqf

    def executable_cache(self) -> ExecutableCache | None:
        """The cache of this runner's compiled steps (``RunnerConfig.executable_cache_dir``), keyed by everything
        they depend on (``executable_cache.fingerprint``); None without a directory."""
        d = self.config.executable_cache_dir
        if not d:
            return None
        devices = list(self.mesh.devices.flat)
        cfg = dataclasses.replace(self.config, fail_on_compile=False, warmup_threads=None, executable_cache_dir=None)
        key = fingerprint(
            devices[0].client.platform, devices[0].client.platform_version,
            [(d.id, d.device_kind) for d in devices], self.mesh.axis_names, self.mesh.devices.shape,
            self.model_config, cfg, self.kv_spec, self._kv_shardings()[0][0].spec,
            [(leaf.shape, str(leaf.dtype)) for leaf in self.state], [s.spec for s in self._state_shardings],
            str(self.state_treedef))
        return ExecutableCache(d, key, devices)

    def _compile(self, t: int, p: int, variant: str, s: int | None = None) -> jax.stages.Compiled:
        """The step of bucket (t, p) with sampler ``variant`` (``s``: one of the bucket's ``seq_buckets``; None: its own
        slots), compiled if it was not (warm-up compiles every one)."""
        sid = (t, p, variant) if s is None else (t, p, variant, s)
        if sid not in self._compiled:
            for key in self._part_keys(*sid):
                if key not in self._parts:
                    self._parts[key] = self.compile(self._lower_part(key), t)
            self._compiled[sid] = self._assemble(*sid)
        return self._compiled[sid]

    def _split(self, variant: str) -> bool:
        """Whether ``variant``'s steps are two calls (``separate_sampler``)."""
        mode = self.config.separate_sampler
        return mode is True or (mode == "except_greedy" and variant != VARIANTS[0])

    def _part_users(self) -> dict[tuple, list[tuple]]:
        """Every compiled part of every step (``_part_keys``), in warm-up's order, with the steps that use it (each
        as ``_compile``'s key: (t, p, variant), and the slots last where they are one of the ``seq_buckets``)."""
        users: dict[tuple, list[tuple]] = {}
        for t, s, p in self.bucket_shapes():
            fewer = self._fewer_seqs(t, s)
            for v in VARIANTS:
                sid = (t, p, v) if fewer is None else (t, p, v, fewer)
                for k in self._part_keys(*sid):
                    users.setdefault(k, []).append(sid)
        return users

    def part_keys(self) -> list[tuple]:
        """Every part warm-up compiles (``_part_keys`` of every step), in its order."""
        return list(self._part_users())

    def _part_keys(self, t: int, p: int, variant: str, s: int | None = None) -> list[tuple]:
        """The compiled parts of the step of bucket (t, p) with sampler ``variant``: ("step", t, p, variant), or
        where ``separate_sampler`` splits it ("forward", t, p) -- shared by the variants -- and ("sample", t, p,
        variant); ("switch", t, p) where ``sampler_switch`` serves the variant. ``s`` (one of the bucket's
        ``seq_buckets``): each key ends with it."""
        tail = () if s is None else (s,)
        if variant in self._switch:
            return [("switch", t, p, *tail)]
        if self._split(variant):
            return [("forward", t, p, *tail), ("sample", t, p, variant, *tail)]
        return [("step", t, p, variant, *tail)]

    def _assemble(self, t: int, p: int, variant: str, s: int | None = None):
        """The step of (t, p, variant[, s]) from its compiled parts: called as ``compiled(state, kv_cache,
        token_pages, prev_sampled, tok, seqi, seqf)`` either way."""
        keys = self._part_keys(t, p, variant, s)
        if len(keys) == 1:
            return self._parts[keys[0]]
        return _SplitStep(self._parts[keys[0]], self._parts[keys[1]], self._replicated)

    def _lower_part(self, key: tuple) -> jax.stages.Lowered:
        fn, args = self._part_call(key)
        return fn.lower(*args)

    def _part_call(self, key: tuple) -> tuple[Callable, tuple]:
        """The jitted function of a compiled part (``_part_keys``) and the arguments (abstract inputs) it is
        lowered with."""
        kind, t, p, variant, s = _key_fields(key)
        args = self._input_shapes(t, p, s)
        if kind == "sample":
            logits = jax.ShapeDtypeStruct((args[2].shape[0], self.model_config.vocab_size), jnp.float32)
            return self._sample_steps[variant], (self.token_pages, self.prev_sampled, logits, *args)
        fn = self._jitted[variant] if kind == "step" else self._switched if kind == "switch" else self._forward_step
        return fn, (self.state, self.kv_cache, self.token_pages, self.prev_sampled, *args)

    def _input_shapes(self, t: int, p: int, s: int | None = None) -> tuple[jax.ShapeDtypeStruct, ...]:
        """The shapes of the three input buffers (``_pack``) of a step of bucket (t, p) (``s`` sequence slots; None:
        the bucket's own)."""
        s = s or self.config.seqs_for(t)
        sd = jax.ShapeDtypeStruct
        return (sd((_TOK_ROWS, t), jnp.int32), sd((s + 1, _SEQ_COLS + p + _BIAS_COLS), jnp.int32),
                sd((s, _SEQF_COLS), jnp.float32))

    def compiler_options(self, tokens: int) -> dict[str, str | bool]:
        """XLA's options for the step of a bucket of ``tokens`` tokens (``xla_dot_merger``,
        ``triton_gemm_max_tokens``)."""
        opts = {} if self.config.xla_dot_merger else dict(NO_DOT_MERGER)
        limit = self.config.triton_gemm_max_tokens
        if limit is not None and tokens > limit:
            opts.update(NO_TRITON_GEMM)
        return opts

    def compile(self, lowered: jax.stages.Lowered, tokens: int) -> jax.stages.Compiled:
        """The step of a bucket of ``tokens`` tokens, compiled with this runner's XLA options
        (``compiler_options``)."""
        return lowered.compile(compiler_options=self.compiler_options(tokens))

    def lower(self, t: int, p: int, variant: str, s: int | None = None) -> jax.stages.Lowered:
        """The step of bucket (``t`` tokens, ``p`` pages; ``s`` sequence slots, None: the bucket's own) with sampler
        ``variant``, lowered (one executable: the model inlined, whatever ``separate_sampler`` says)."""
        fn, args = self._part_call(("step", t, p, variant) + (() if s is None else (s,)))
        return fn.lower(*args)

    def _compile_copy(self):
        if self._copy_compiled is None:
            c = jax.ShapeDtypeStruct((self.config.max_copies,), jnp.int32)
            self._copy_compiled = self._copy_jitted.lower(self.kv_cache, self.token_pages, c, c).compile()
        return self._copy_compiled

    # ---- page copies (copy-on-write) ---------------------------------------------------------

    def _count_compiles(self, c0: int) -> None:
        if self._compiles_at_warmup is not None:
            self.compiles_while_serving += thread_compilation_count() - c0

    def copy_pages(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy page ``src`` to ``dst`` for each pair (K, V and token ids), in stream order."""
        c0 = thread_compilation_count()
        try:
            self._copy_pages(pairs)
        finally:
            self._count_compiles(c0)

    def _copy_pages(self, pairs: Sequence[tuple[int, int]]) -> None:
        c = self.config.max_copies
        for i in range(0, len(pairs), c):
            chunk = pairs[i:i + c]
            src = np.zeros(c, np.int32)
            dst = np.full(c, self.config.num_pages, np.int32)
            src[:len(chunk)] = [a for a, _ in chunk]
            dst[:len(chunk)] = [b for _, b in chunk]
            src, dst = jax.device_put((src, dst), self._replicated)
            self.kv_cache, self.token_pages = self._compile_copy()(self.kv_cache, self.token_pages, src, dst)

    # ---- one step ----------------------------------------------------------------------------

    def execute(self, work: Sequence[SequenceWork], variant: str | None = None, scored: int | None = None
                ) -> StepHandle:
        """Dispatch one step (one compiled call, or several where ``plan`` splits it); returns at once
        with a handle to its results. ``scored``: the work's scored prompt tokens (``SequenceWork.scores``), when
        the caller counted them (else counted here)."""
        if not self.weights_loaded:
            raise RuntimeError("the runner has no weights yet (set_weights)")
        c0 = thread_compilation_count()
        write = self._write_half * self.max_rows
        read = self.max_rows - write
        try:
            if scored is None:
                scored = sum(len(w.scores) for w in work)
            parts = self.plan([len(w.token_ids) for w in work], scored)
            packed = [self._pack(work, rows, read, write) for rows in parts]
            variant = self._variant(variant, max((pk[2] for pk in packed), key=VARIANTS.index))
            calls = [(self._compile(t, p, variant, s), self._set_variant(arrays, variant))
                     for t, p, _, arrays, _, s in packed]
        finally:
            self._count_compiles(c0)
        # The host buffers go to the executable as they are: its call moves them to the device
        # (cheaper than a device_put first: measured 0.4-0.6 ms a step on the CPU). They are fresh
        # each step and never written again, so a zero-copy alias of them is safe.
        sampled = self.prev_sampled
        outs = []
        t0 = time.perf_counter()
        for compiled, arrays in calls:
            (self.kv_cache, self.token_pages, sampled, lps, top_ids, top_lps, logits) = compiled(
                self.state, self.kv_cache, self.token_pages, sampled, *arrays)
            outs.append((lps, top_ids, top_lps, logits))
        self.call_seconds += time.perf_counter() - t0
        self.prev_sampled = sampled
        self._write_half ^= 1
        self.tokens_run += sum(len(w.token_ids) for w in work)
        self.rows_run += sum(pk[0] for pk in packed)
        self.calls_run += len(calls)
        return StepHandle(self, len(work), sampled, write, parts, outs, any(pk[4] for pk in packed), variant,
                          scored)

    def plan(self, ns: Sequence[int], scored: int = 0) -> list[list[int] | None]:
        """The rows of each compiled call of a step whose rows hold ``ns[i]`` tokens: ``[None]`` (one call of
        the smallest bucket that holds them all), or the row lists of several calls of smaller buckets when
        their costs (``step_costs``) add up to at least 5 % less than the one call's. Rows of more than one
        token (prompt chunks) are placed first, largest first, each in the first call with room; single
        tokens (decode rows) fill the rest in order. No row of a step reads what another row of it writes
        (the scheduler shares a prompt's pages from the step after the one that wrote them), so the calls
        may run in any order. A step that scores prompt tokens (``scored`` rows) runs whole."""
        costs = self.step_costs
        total = sum(ns)
        single = _pick(self.token_buckets, total, "tokens per step")
        if not costs or len(ns) < 2 or single == self.token_buckets[0] or scored:
            return [None]
        if single not in self._plans:
            self._plans[single] = _splits(self.token_buckets, single, costs)
        limit = 0.95 * costs[single]
        for cost, combo in self._plans[single]:
            if cost >= limit:
                break
            if sum(combo) >= total:
                rows = _place(ns, combo, self.config.max_num_seqs)
                if rows is not None:
                    return rows
        return [None]

    def prepare(self, work: Sequence[SequenceWork], variant: str | None = None
                ) -> tuple[jax.stages.Compiled, tuple, bool]:
        """The compiled step of the work's bucket and sampler variant (one call, never split), its three
        input arrays on the device, and whether it wants logprobs. Benchmarks call it back to back as
        ``compiled(state, kv_cache, token_pages, prev_sampled, *args)``. ``variant`` None: the cheapest
        that serves the work; a costlier one may be named (tests, benchmarks), a cheaper one is refused."""
        t, p, needed, host_arrays, want_lp, s = self._pack(work)
        variant = self._variant(variant, needed)
        return (self._compile(t, p, variant, s),
                jax.device_put(self._set_variant(host_arrays, variant), self._replicated),
                want_lp)

    def _set_variant(self, arrays: tuple[np.ndarray, np.ndarray, np.ndarray], variant: str):
        """The step's host buffers with ``variant``'s index where ``sampler_switch``'s executable reads it
        (``seqi[S, 0]``, a cell no other input uses); as they are otherwise."""
        if variant in self._switch:
            arrays[1][arrays[2].shape[0], 0] = self._switch.index(variant)
        return arrays

    @staticmethod
    def _variant(variant: str | None, needed: str) -> str:
        if variant is None:
            return needed
        if variant not in VARIANTS or not serves(variant, needed):
            raise ValueError(f"sampler variant {variant!r} cannot serve this step (it needs {needed!r})")
        return variant

    def _pack(self, work: Sequence[SequenceWork], rows: list[int] | None = None, read: int = 0, write: int = 0
              ) -> tuple[int, int, str, tuple[np.ndarray, np.ndarray, np.ndarray], bool, int | None]:
        """The bucket (tokens, pages) of one call of a step, the sampler variant its rows need, its three
        host buffers, whether it wants logprobs, and its sequence slots where they are one of the bucket's
        ``seq_buckets`` (the fewest that hold its rows; None: the bucket's own). ``rows``: the rows of
        ``work`` this call computes (None: all); a row's draw goes to ``write + its row`` of the sampled
        buffer, and a token the previous step drew is read from ``read + that step's row``.

        One Python pass gathers each row's facts into flat lists; positions, page slots and the
        page table are then filled by numpy over all rows at once (per-element numpy writes in
        a Python loop cost more than the data at a few hundred rows)."""
        if not work:
            raise ValueError("a step needs at least one sequence")
        cfg, page_size = self.config, self.config.page_size
        if len(work) > cfg.max_num_seqs:
            raise ValueError(f"{len(work)} sequences exceed max_num_seqs={cfg.max_num_seqs}")
        index = range(len(work)) if rows is None else rows
        if rows is not None:
            work = [work[i] for i in rows]
        S = len(work)
        flat_tokens: list[int] = []
        page_parts = []
        all_arrays = True
        ns, ints, floats, num_pages, src = [], [], [], [], []
        biased_rows = []
        scored = []       # (logits row, scored token) of each scoring row, after the work's rows
        flags = 0
        row = 0
        for i, w in enumerate(work):
            toks = w.token_ids
            n = len(toks)
            if n == 0:
                raise ValueError(f"sequence {index[i]} has no tokens to compute")
            flat_tokens += toks
            ns.append(n)
            pages = w.page_ids
            page_parts.append(pages)
            if all_arrays and type(pages) is not np.ndarray:
                all_arrays = False
            num_pages.append(len(pages))
            row += n
            if w.prev_row >= 0:
                src.append((row - 1, read + w.prev_row))
            sr = w.sampling_row
            if sr is None:
                sr = sampling_row(w.params)
            floats.append(sr[0])
            flags |= sr[2]
            # kv_len, cu_q_len (filled below), logits row, top_k, prompt_len, seed (low), output index, where its
            # draw goes, seed (high)
            ints.append((w.num_computed + n, 0, row - 1, sr[1], w.prompt_len, _i32_bits(w.seed),
                         w.output_index, write + index[i], _i32_bits(w.seed >> 32)))
            if w.scores:
                if w.score_at < 0 or w.score_at + len(w.scores) > n:
                    raise ValueError(f"sequence {index[i]}: scores positions {w.score_at}.."
                                     f"{w.score_at + len(w.scores) - 1} of a {n}-token chunk")
                first = row - n + w.score_at
                scored.extend(zip(range(first, first + len(w.scores)), w.scores))
            if w.allowed:     # the row's own set (a chunk that does not sample has none): the full variant
                flags |= _ALLOWED
            if w.banned or w.logit_bias or w.allowed:
                # an allowed set takes its ids (bias 0) and a marker entry (ALLOWED_MARK, sampler.py)
                if len(w.banned) + len(w.logit_bias) + (len(w.allowed) + 1 if w.allowed else 0) > MAX_BANNED:
                    raise ValueError(f"sequence {index[i]}: more than {MAX_BANNED} banned, biased and allowed ids")
                biased_rows.append((i, w.banned, w.logit_bias, w.allowed))
        num_tokens = row
        rows_needed = S + len(scored)
        t = _pick(self.token_buckets, max(num_tokens, rows_needed), "tokens per step")
        own = cfg.seqs_for(t)
        s = _pick(self._seq_options[t], rows_needed, "rows per step") if rows_needed <= own else own
        if rows_needed > s:
            raise ValueError(f"{S} sequences and {len(scored)} scored prompt tokens exceed the {s} rows of a step")
        p = _pick(self.page_buckets, max(num_pages), "pages per sequence")

        # Three host buffers (one transfer each; many small transfers cost more than the data).
        tok = np.zeros((_TOK_ROWS, t), np.int32)
        seqi = np.zeros((s + 1, _SEQ_COLS + p + _BIAS_COLS), np.int32)
        seqf = np.zeros((s, _SEQF_COLS), np.float32)
        seqf[:, 1] = 1.0                                   # top_p
        seqf[:, 3] = 1.0                                   # repetition penalty
        seqf[:S] = floats
        head = seqi[:S, :_SEQ_COLS]
        head[:] = ints
        ns_a = np.asarray(ns, np.int64)
        ends = head[:, 0]                                  # kv_lens
        npages = np.asarray(num_pages, np.int64)
        short = np.flatnonzero(npages * page_size < ends)
        if short.size:
            i = int(short[0])
            raise ValueError(f"sequence {index[i]}: {num_pages[i]} pages cannot hold {int(ends[i])} tokens")
        starts = np.cumsum(ns_a) - ns_a                     # first row of each sequence
        head[:, 1] = starts                                # cu_q_lens
        seqi[S:, 1] = num_tokens
        seqi[S:, 7] = 2 * self.max_rows                    # padding rows' draws go nowhere
        ids_at, bias_at = _SEQ_COLS + p, _SEQ_COLS + p + MAX_BANNED
        seqi[:, ids_at:bias_at] = -1                       # biased ids (bias 0 where none)
        for i, banned, biased, allowed in biased_rows:
            n = len(banned)
            seqi[i, ids_at:ids_at + n] = banned
            seqi[i, bias_at:bias_at + n] = _BAN_BITS
            if biased:
                seqi[i, ids_at + n:ids_at + n + len(biased)] = [t for t, _ in biased]
                seqi[i, bias_at + n:bias_at + n + len(biased)] = np.array([b for _, b in biased],
                                                                           np.float32).view(np.int32)
                n += len(biased)
            if allowed:       # the marker, then the ids (bias 0): those kept, every other id -inf (the full sampler)
                seqi[i, ids_at + n:ids_at + n + len(allowed) + 1] = [ALLOWED_MARK, *allowed]
        if scored:
            # a scoring row: no tokens and no context of its own (kv_len 0, as padding), its logits the position's,
            # greedy over the one allowed id (the prompt's next token), whose raw logprob and top ones it returns;
            # its draw goes nowhere
            m = len(scored)
            at = np.asarray(scored, np.int64)
            seqi[S:S + m, 2] = at[:, 0]
            seqi[S:S + m, ids_at] = ALLOWED_MARK
            seqi[S:S + m, ids_at + 1] = at[:, 1]
            seqf[S:S + m, 0] = 0.0
            flags |= _ALLOWED | _LOGPROBS
        page_table = seqi[:S, _SEQ_COLS:_SEQ_COLS + p]
        if all_arrays:
            flat_pages = np.concatenate(page_parts)
        else:
            flat_pages = np.fromiter(itertools.chain.from_iterable(page_parts), np.int64, int(npages.sum()))
        page_table[np.arange(p) < npages[:, None]] = flat_pages     # row by row, in order

        token_ids, token_src, positions, slot_page, slot_offset = tok[0], tok[1], tok[2], tok[3], tok[4]
        token_ids[:num_tokens] = flat_tokens
        token_src[:] = -1
        for r, prev in src:
            token_src[r] = prev
        if num_tokens == S:                                # decode only: one token per sequence
            tok_seq = np.arange(S)
            pos = ends - 1
        else:
            tok_seq = np.repeat(np.arange(S), ns_a)
            pos = np.arange(num_tokens) + np.repeat(ends - ns_a - starts, ns_a)
        positions[:num_tokens] = pos
        slot_page[num_tokens:] = cfg.num_pages             # out of range: dropped on write
        used = page_table[tok_seq, pos // page_size]
        slot_page[:num_tokens] = used
        slot_offset[:num_tokens] = pos % page_size
        if (used >= cfg.num_pages).any() or (used < 0).any():
            raise ValueError(f"page id out of range [0, {cfg.num_pages})")
        want_lp = bool(flags & _LOGPROBS)
        variant = variant_for(penalties=bool(flags & _PENALTIES), filters=bool(flags & _FILTERS),
                              allowed=bool(flags & _ALLOWED),
                              random=bool(flags & _RANDOM), logprobs=want_lp)
        return t, p, variant, (tok, seqi, seqf), want_lp, self._fewer_seqs(t, s)

    def step(self, work: Sequence[SequenceWork], variant: str | None = None) -> StepOutput:
        """Dispatch one step and wait for it (greedy unless the work says otherwise)."""
        return self.execute(work, variant).result()

    def _check_no_compile(self) -> None:
        new = self.compiles_while_serving - self._compiles_reported
        if self.config.fail_on_compile and new:
            self._compiles_reported = self.compiles_while_serving
            raise CompiledAfterWarmupError(f"{new} XLA compilation(s) after warm-up")
