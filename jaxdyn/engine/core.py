"""EngineCore: the scheduler, the runner and the host bookkeeping of one step.

``step()`` schedules and dispatches step N+1 *before* it reads the tokens of
step N, so the device computes while the host does its bookkeeping (stop
checks, detokenization, outputs). A sequence whose next input is still on the
device takes it there (``SequenceWork.prev_row``). The price: a sequence that
stops at step N has already been given step N+1, whose token is discarded; its
pages are freed at once, which is safe because steps run in order on the device.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import random
import time
from collections.abc import Iterable

import jax
import numpy as np

from jaxdyn.engine.detokenizer import IncrementalDetokenizer
from jaxdyn.engine.metrics import EngineMetrics
from jaxdyn.engine.request import (
    CompletionOutput, Logprob, Request, RequestOutput, Sequence, SeqStatus, TextPrefix, TokenPrefix)
from jaxdyn.engine.runner import (
    FUSED_QUANTIZE_SITES, MAX_BANNED, ModelRunner, RunnerConfig, SequenceWork, StepHandle, check_attention_programs,
    check_flag, check_fp8_products, check_sampler_switch, check_seq_buckets, check_separate_sampler, is_count,
    gpu_memory_stats, kv_cache_dtype, sampling_row)
from jaxdyn.engine.sampler import RANK_COL
from jaxdyn.engine.sampling_params import SamplingParams
from jaxdyn.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, check_schedule_policy
from jaxdyn.engine.tokenizer import Tokenizer
from jaxdyn.kv.allocator import PageAllocator
from jaxdyn.kv.cache import check_kv_cache_dtype
from jaxdyn.kv.radix import RadixCache

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine refuses; ``param`` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None            # None: sized from free device memory (GPU) or a default (CPU)
    kv_memory_fraction: float = 0.85         # of JAX's memory limit, less the weights: the KV pages (GPU)
    # the share of each GPU's memory JAX's allocator takes (vLLM's): set by build_engine before JAX starts
    # (xla_options.gpu_memory_fraction); None: XLA_CLIENT_MEM_FRACTION's if set, else 0.9
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int | None = None         # None: min(model's max positions, 8192)
    token_buckets: tuple[int, ...] | None = None
    page_buckets: tuple[int, ...] | None = None
    # (tokens, sequence slots) pairs: a token bucket also compiled with fewer slots than its own (RunnerConfig)
    seq_buckets: tuple[tuple[int, int], ...] = ()
    fail_on_compile: bool = False
    overlap: bool = True                     # dispatch step N+1 before reading step N
    seed: int | None = None                  # seeds unseeded requests' draws (None: random)
    enable_prefix_caching: bool = True       # radix prefix cache over whole KV pages
    warmup_threads: int | None = None        # executables compiled at once (None: by device, see runner)
    first_compiles_alone: bool = False       # each bucket's first variant compiled alone (RunnerConfig)
    executable_cache_dir: str | None = None  # compiled steps saved / loaded here (None: no cache)
    split_steps: bool | None = None          # mostly-padding steps as smaller buckets' (None: off on the CPU)
    xla_dot_merger: bool = False             # XLA's dot merger on for the steps (RunnerConfig: off, it copies weights)
    attention_in_place: bool = True          # the attention kernels store into one output, no merge (RunnerConfig)
    # XLA's Triton GEMMs only in steps of at most this many tokens (RunnerConfig); None: in every step;
    # "auto": FP8_TRITON_GEMM_MAX_TOKENS for an fp8 model on a GPU, else None
    triton_gemm_max_tokens: int | None | str = "auto"
    # an fp8 model's steps of at most this many tokens take the Pallas fp8-weight kernel (RunnerConfig);
    # "auto": FP8_KERNEL_MAX_TOKENS on a GPU, else 0 (never); 0 for models without fp8 weights
    fp8_kernel_max_tokens: int | str = "auto"
    # which of an fp8 model's row-parallel inputs one Pallas kernel quantizes: off, o_proj, all (RunnerConfig);
    # "auto": FP8_FUSED_QUANTIZE on a GPU, else off
    fp8_fused_quantize: str = "auto"
    # fp8_fused_quantize in steps of at least this many tokens only (RunnerConfig); "auto":
    # FP8_FUSED_QUANTIZE_MIN_TOKENS on a GPU, else 0
    fp8_fused_quantize_min_tokens: int | str = "auto"
    # an fp8 model's residual add, RMSNorm and per-token quantization in one kernel (RunnerConfig); "auto":
    # FP8_FUSED_NORM on a GPU, else off
    fp8_fused_norm: bool | str = "auto"
    # q's and k's rotation and the K/V write in one kernel a layer (RunnerConfig); "auto": FUSED_ROPE_KV on a GPU,
    # else off
    fused_rope_kv: bool | str = "auto"
    # the model compiled once a bucket, the sampler apart; "except_greedy": greedy steps one executable each
    # (RunnerConfig)
    separate_sampler: bool | str = False
    kv_cache_dtype: str = "auto"             # "auto" (the model's) or "fp8" / "fp8_e4m3" (RunnerConfig)
    attention_programs: int = 0              # > 0: the attention kernels' programs loop over items (RunnerConfig)
    prefill_programs: int | None = None      # the prefill kernel's alone (RunnerConfig); None: attention_programs
    skip_idle_prefill: bool = False          # the prefill kernel only in steps with a prompt chunk (RunnerConfig)
    # fp8 KV pages: the decode kernel's products on e4m3 operands, "off" / "qk" / "qk_pv" (RunnerConfig)
    attention_fp8_products: str = "off"
    # one executable a bucket, the sampler variant picked on device; "plain_full": plain's and full's steps only;
    # None: "plain_full" on a GPU unless separate_sampler, else False (RunnerConfig)
    sampler_switch: bool | str | None = None
    nested_layers: bool = True               # a layer traced once a step, its jaxpr inlined a layer (RunnerConfig)
    schedule_policy: str = "fcfs"            # waiting order: "fcfs" or "lof", longest max_tokens first (scheduler)
    # After warm-up, Python's cyclic garbage collector leaves alone what loading and compiling made (the model's
    # modules, JAX's and XLA's objects, the tokenizer: ``settle_heap``): a full collection scanned all of it, a
    # host stall of ~170 ms a few times a run at 256 running (CPU, ``benchmarks/results/engine_host_time.md``),
    # in which the device waits. None: on for accelerators, off on the CPU (a process that builds many engines,
    # as the tests do, would keep every earlier engine's cyclic garbage).
    gc_freeze: bool | None = None

    def __post_init__(self):
        for name in ("page_size", "max_num_batched_tokens", "max_num_seqs"):
            v = getattr(self, name)
            if not (is_count(v) and v >= 1):
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        for name, least in (("num_pages", 1), ("max_model_len", 2)):     # None: sized by the engine
            v = getattr(self, name)
            if v is not None and not (is_count(v) and v >= least):
                # (a context of 1 token leaves none to generate: every request was refused)
                raise ValueError(f"{name}: expected None or an integer >= {least}, got {v!r}")
        for name in ("token_buckets", "page_buckets"):
            v = getattr(self, name)
            if v is not None:
                # checked here, not in the warm-up (a 0 there was a ZeroDivisionError from inside JAX's reshape)
                items = list(v) if isinstance(v, Iterable) and not isinstance(v, (str, bytes)) else []
                if not items or not all(is_count(b) and b >= 1 for b in items):
                    raise ValueError(f"{name}: expected integers >= 1, got {v!r}")
                object.__setattr__(self, name, tuple(sorted(set(items))))
        for name in ("kv_memory_fraction", "gpu_memory_utilization"):
            v = getattr(self, name)
            if not ((v is None and name == "gpu_memory_utilization")
                    or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1)):
                raise ValueError(f"{name}: expected a number in (0, 1], got {v!r}")
        # canonical, so that "fp8" and "fp8_e4m3" share compiled steps and cache entries
        object.__setattr__(self, "kv_cache_dtype", check_kv_cache_dtype(self.kv_cache_dtype))
        check_separate_sampler(self.separate_sampler)
        check_attention_programs(self.attention_programs)
        if self.prefill_programs is not None:
            check_attention_programs(self.prefill_programs, "prefill_programs")
        # the pairs' form here; each against its token bucket where the runner's config is made (RunnerConfig)
        object.__setattr__(self, "seq_buckets", check_seq_buckets(self.seq_buckets))
        check_fp8_products(self.attention_fp8_products, self.kv_cache_dtype)
        check_schedule_policy(self.schedule_policy)
        check_sampler_switch(self.sampler_switch, self.separate_sampler)
        check_flag("nested_layers", self.nested_layers)
        t = self.triton_gemm_max_tokens
        if not (t is None or t == "auto" or is_count(t)):
            raise ValueError(f"triton_gemm_max_tokens: expected None, 'auto' or an integer >= 0, got {t!r}")
        f = self.fp8_kernel_max_tokens
        if not (f == "auto" or is_count(f)):
            raise ValueError(f"fp8_kernel_max_tokens: expected 'auto' or an integer >= 0, got {f!r}")
        if self.fp8_fused_quantize not in ("auto",) + FUSED_QUANTIZE_SITES:
            raise ValueError(f"fp8_fused_quantize: expected auto, off, o_proj or all, got {self.fp8_fused_quantize!r}")
        m = self.fp8_fused_quantize_min_tokens
        if not (m == "auto" or is_count(m)):
            raise ValueError(f"fp8_fused_quantize_min_tokens: expected 'auto' or an integer >= 0, got {m!r}")
        for name in ("fp8_fused_norm", "fused_rope_kv"):
            value = getattr(self, name)
            if value != "auto" and not isinstance(value, bool):
                raise ValueError(f"{name}: expected 'auto', True or False, got {value!r}")


# An fp8 (w8a8) model's steps on a GPU: no Triton GEMMs. XLA's search of Triton tilings for fp8 products made the
# 8B shape's cold start minutes long, and cuBLASLt's products are as fast: ten buckets, empty caches, on an H200,
# ShareGPT-shaped offline run (``benchmarks/gpu/ab_offline.py``, 2026-12-03), Triton in no step: warm-up 51.8 s,
# 14,592 output tok/s; Triton in the 16- and 64-token steps: 79.2 s, 14,722 (1.009x, one run each: noise);
# Triton everywhere: over 260 s (the run was stopped), 14,469 tok/s once its cache was warm
FP8_TRITON_GEMM_MAX_TOKENS = 0


# Which row-parallel inputs of an fp8 model on a GPU ``pallas_kernels.fp8_quantize`` quantizes, in steps of at least
# FP8_FUSED_QUANTIZE_MIN_TOKENS tokens. On an H200 (8B shape, ShareGPT-shaped offline run, ``benchmarks/gpu/
# ab_offline.py``): the kernel's first form (two loops over a row) made every step dearer (2026-12-03, 0.946x);
# the one-pass form, with down_proj's input made from gate's and up's raw products, cut the steps of 192-2,048
# tokens by 3-7 % (2,048: 30.37 -> 28.61 ms; 2026-12-04). Its cost: XLA compiles the kernels again in every
# executable that holds them (cold start of that run 122-130 s against 59-65 s). From 512 tokens only until
# session 35: the buckets of 192-384 gained 0.0-0.4 ms a step, and in ``benchmarks/schedule_sim.py``'s schedule of
# that run the kernel from 512 tokens gave 16,262 output tok/s against 16,296 from 192 and 15,921 without. The
# rescaling of the raw products passed its GPU tests on an H200 (``tests/pallas_kernels/test_fp8_quantize.py``,
# ``test_fp8_linear.py``, 2026-12-04, fifteenth session); ``--fp8-fused-quantize off`` turns it off.
# From every step since session 35 (0): with ``FP8_FUSED_NORM`` on, an H100 ran 15,750 against 15,532 output tok/s
# with the floor at 512 (1.014x, two rounds each from its own empty cache; the 128-384-token steps 0.17-0.37 ms
# cheaper, the 16- and 64-token steps within their noise), and XLA's time summed over the warm-up fell 245 -> 166 s (cold start 40.1 -> 34.9 s): the kernels cost
# less compile time than XLA's own quantization fusions (``benchmarks/results/gpu_suite_h200.md``, thirty-fifth
# session, call 3)
FP8_FUSED_QUANTIZE = "all"
FP8_FUSED_QUANTIZE_MIN_TOKENS = 0

# An fp8 model's steps of at most this many tokens on a GPU: the Pallas fp8-weight kernel for its products. 0
# (never): on an H200 (8B shape) its products, alone, took 0.76-0.95x cuBLASLt's at 16 rows with the best blocks
# of a sweep, but a step's products with its K-split sums took 1.06x (layer stack 4.01 vs 3.78 ms,
# ``benchmarks/gpu/fp8_matmul_probe.py``), and the offline run's 16- and 64-token steps cost 5.11 / 6.74 ms
# against 4.75 / 4.69 (``benchmarks/gpu/ab_offline.py``, 2026-12-03)
FP8_KERNEL_MAX_TOKENS = 0


# An fp8 model's residual add, RMSNorm and per-token quantization of each layer input in one
# ``pallas_kernels.rms_norm_fp8`` kernel on a GPU (``llama.Fp8Options.fused_norm``). One H100 each time (8B shape,
# fp8 KV pages, ShareGPT-shaped offline run, each configuration from its own empty JAX cache, ``benchmarks/gpu/
# ab_offline.py``, session 35): on against off 15,617 / 15,251 output tok/s (1.024x, three rounds, the kernel at 4
# warps) and 15,420 / 15,118 (1.020x, two rounds, 8 warps under 2,048 rows); the committed kernel (8 warps) against
# session 34's tree 15,532 / 15,308 (1.015x, two rounds); the steps of 192-1,024 tokens 2-10 % cheaper; XLA's time
# summed over the warm-up's 30 executables 417 -> 218 s, 248 -> 217 s and 330 -> 245 s (cold start 67.2 -> 42.9 s,
# 39.3 -> 36.0 s, 52.7 -> 40.1 s): XLA makes each site three Triton fusions that it compiles and tunes in every
# executable. Not the same numbers as the unfused layers on a GPU: the kernel rounds the norm's output to bf16
# before quantizing it (as Hugging Face's RMSNorm and the unjitted operations do), where XLA's compiled unfused
# layers quantize it unrounded (``xla_allow_excess_precision``): about 2 % of the fp8 codes one step apart
FP8_FUSED_NORM = True


def fp8_fused_norm(config: EngineConfig, model_config, platform: str) -> bool:
    """``EngineConfig.fp8_fused_norm`` resolved for a model on ``platform``: False without fp8 weights, "auto"
    FP8_FUSED_NORM on a GPU, else False."""
    return model_config.quantization == "fp8" and _on_gpu_if_auto(config.fp8_fused_norm, FP8_FUSED_NORM, platform)


def _on_gpu_if_auto(value: bool | str, default: bool, platform: str) -> bool:
    """An "auto" / True / False option resolved on ``platform``: "auto" is ``default`` on a GPU, else False."""
    return default and platform == "gpu" if value == "auto" else value


# q's and k's rotary embedding and the K/V write of each layer in one ``pallas_kernels.rope_kv`` kernel on a GPU
# (``llama.AttentionOptions.fused_rope_kv``), where XLA makes three kernels a layer. One H100 (8B shape, fp8 weights
# and KV pages, ShareGPT-shaped offline run, each configuration from its own empty JAX cache, two rounds,
# ``benchmarks/gpu/ab_offline.py``, session 36): 15,724 output tok/s against 15,615 without (1.007x, within the runs'
# spread), and XLA's time summed over the warm-up's 30 executables 172 -> 132 s (cold start 35.4 -> 30.9 s): on.
FUSED_ROPE_KV = True


def fused_rope_kv(config: EngineConfig, platform: str) -> bool:
    """``EngineConfig.fused_rope_kv`` resolved on ``platform``: "auto" FUSED_ROPE_KV on a GPU, else False."""
    return _on_gpu_if_auto(config.fused_rope_kv, FUSED_ROPE_KV, platform)


def fp8_kernel_limit(config: EngineConfig, model_config, platform: str) -> int:
    """``EngineConfig.fp8_kernel_max_tokens`` resolved for a model on ``platform``: 0 for a model without fp8
    weights (the option changes nothing there), "auto" FP8_KERNEL_MAX_TOKENS on a GPU, else 0."""
    f = config.fp8_kernel_max_tokens
    if model_config.quantization != "fp8":
        return 0
    if f != "auto":
        return f
    return FP8_KERNEL_MAX_TOKENS if platform == "gpu" else 0


def fp8_fused_quantize(config: EngineConfig, model_config, platform: str) -> str:
    """``EngineConfig.fp8_fused_quantize`` resolved for a model on ``platform``: off without fp8 weights, "auto"
    FP8_FUSED_QUANTIZE on a GPU, else off."""
    if model_config.quantization != "fp8":
        return "off"
    f = config.fp8_fused_quantize
    if f == "auto":
        return FP8_FUSED_QUANTIZE if platform == "gpu" else "off"
    return f


def fp8_fused_quantize_min(config: EngineConfig, platform: str) -> int:
    """``EngineConfig.fp8_fused_quantize_min_tokens`` resolved on ``platform``: "auto" FP8_FUSED_QUANTIZE_MIN_TOKENS
    on a GPU, else 0."""
    m = config.fp8_fused_quantize_min_tokens
    if m != "auto":
        return m
    return FP8_FUSED_QUANTIZE_MIN_TOKENS if platform == "gpu" else 0


def triton_gemm_limit(config: EngineConfig, model_config, platform: str) -> int | None:
    """``EngineConfig.triton_gemm_max_tokens`` with "auto" resolved for a model on ``platform``."""
    t = config.triton_gemm_max_tokens
    if t != "auto":
        return t
    return FP8_TRITON_GEMM_MAX_TOKENS if platform == "gpu" and model_config.quantization == "fp8" else None


class EngineCore:
    def __init__(self, graphdef, state, mesh, model_config, tokenizer: Tokenizer | None = None,
                 config: EngineConfig = EngineConfig(), eos_token_ids: tuple[int, ...] | None = None):
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.load_info: dict[str, float] = {}   # seconds, weight_bytes, warmup_seconds (build_engine)
        if config.max_model_len is not None and config.max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                             f"({model_config.max_position_embeddings})")
        max_model_len = config.max_model_len or min(model_config.max_position_embeddings, 8192)
        self.max_model_len = max_model_len
        ps = config.page_size       # may exceed max_model_len (vLLM's blocks may): a sequence's one page part-filled
        num_pages = config.num_pages or _default_num_pages(state, model_config, mesh, config, max_model_len)
        _check_kv_fits(num_pages, state, model_config, mesh, config)
        platform = mesh.devices.flat[0].platform
        if platform == "gpu":
            check_gpu_kernel_shapes(ps, model_config.head_dim)
            # the attention kernels' 32-bit offsets: the default is capped, a larger explicit count refused
            most = _kernel_page_limit(model_config, mesh, ps)
            if config.num_pages and num_pages > most:
                raise ValueError(f"num_pages={num_pages}: the attention kernels address at most {most} pages of "
                                 f"{ps} tokens for this model (a pool of 2**31 elements or more per layer would "
                                 "overflow their 32-bit offsets); use fewer or larger pages")
            num_pages = min(num_pages, most)
        # the longest sequence the pool holds: a sequence's last token is sampled, never computed, so its KV
        # takes no room (check_request's rule)
        longest = num_pages * ps + 1
        if max_model_len > longest:
            if config.max_model_len is not None:
                raise ValueError(f"max_model_len {max_model_len} exceeds what the KV cache holds: {num_pages} pages "
                                 f"of {ps} tokens serve sequences of at most {longest} tokens; give the cache more "
                                 "pages (num_pages, or a larger memory fraction) or lower max_model_len")
            log.warning("max_model_len lowered from %d to %d: the KV cache's %d pages of %d tokens hold no longer "
                        "sequence", max_model_len, longest, num_pages, ps)
            max_model_len = self.max_model_len = longest
        _check_buckets_hold(config, max_model_len)
        if config.kv_cache_dtype != "auto" and platform == "cpu":
            log.warning("kv_cache_dtype %s on the CPU: XLA's CPU backend converts the whole KV pool around each "
                        "fp8 write and read, so every step costs time in the size of the pool (for correctness "
                        "checks; serve with it on a GPU)", config.kv_cache_dtype)
        model_dtype = jax.tree.leaves(state)[0].dtype
        if config.attention_fp8_products != "off" and (platform != "gpu" or model_dtype.itemsize != 2):
            log.warning("attention_fp8_products %s takes effect in the GPU decode kernel under a 16-bit model only; "
                        "here (%s, %s) attention multiplies as before", config.attention_fp8_products, platform,
                        model_dtype)
        fused = fp8_fused_quantize(config, model_config, platform)
        self.runner = ModelRunner(graphdef, state, mesh, RunnerConfig(
            page_size=ps, num_pages=num_pages, max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs, max_model_len=max_model_len,
            token_buckets=config.token_buckets, page_buckets=config.page_buckets, seq_buckets=config.seq_buckets,
            fail_on_compile=config.fail_on_compile, warmup_threads=config.warmup_threads,
            first_compiles_alone=config.first_compiles_alone,
            executable_cache_dir=config.executable_cache_dir, split_steps=config.split_steps,
            xla_dot_merger=config.xla_dot_merger, attention_in_place=config.attention_in_place,
            triton_gemm_max_tokens=triton_gemm_limit(config, model_config, platform),
            fp8_kernel_max_tokens=fp8_kernel_limit(config, model_config, platform),
            fp8_fused_quantize=fused,
            # the floor only matters with the kernel on (and would otherwise change the steps' cache key)
            fp8_fused_quantize_min_tokens=fp8_fused_quantize_min(config, platform) if fused != "off" else 0,
            fp8_fused_norm=fp8_fused_norm(config, model_config, platform),
            separate_sampler=config.separate_sampler, kv_cache_dtype=config.kv_cache_dtype,
            attention_programs=config.attention_programs, prefill_programs=config.prefill_programs,
            skip_idle_prefill=config.skip_idle_prefill,
            fused_rope_kv=fused_rope_kv(config, platform),
            attention_fp8_products=config.attention_fp8_products,
            sampler_switch=config.sampler_switch, nested_layers=config.nested_layers))
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache = RadixCache(self.allocator, ps) if config.enable_prefix_caching else None
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, ps,
                                                   policy=config.schedule_policy),
                                   self.allocator, self.prefix_cache)
        self.eos_token_ids = engine_eos_ids(model_config, tokenizer, eos_token_ids)
        # the tokenizer's own EOS (vLLM's model EOS): a sequence it ends has no stop_reason; another EOS id (a
        # generation_config.json's, e.g. a chat turn's end) ends it as a stop token, stop_reason that id (vLLM's)
        self._own_eos = getattr(tokenizer, "eos_token_id", None) if eos_token_ids is None else None
        self.requests: dict[str, Request] = {}
        # n > 1 requests whose siblings wait blocked on their leader's prompt (the gauges count them with it)
        self._forking: set[str] = set()
        self.metrics = EngineMetrics(kv_pages_total=num_pages)
        self._rng = random.Random(config.seed)
        self._arrivals = 0
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    def warmup(self, progress: bool = False) -> float:
        seconds = self.runner.warmup(progress)
        freeze = self.config.gc_freeze
        if freeze or (freeze is None and not self.runner.on_cpu):
            settle_heap()
        return seconds

    def load_weights(self, load, compile_steps: bool = True, progress: bool = False):
        """For an engine built on an abstract state: ``ModelRunner.load_weights`` (the steps compile while
        ``load()`` runs); returns what ``load`` returned."""
        return self.runner.load_weights(load, compile_steps, progress)

    # ---- requests ------------------------------------------------------------------------------

    def check_request(self, prompt_ids, params: SamplingParams) -> None:
        """Raise RequestError if the engine would refuse this request (reads config only: thread-safe)."""
        check_request(self, prompt_ids, params)

    def draw_seed(self) -> int:
        return self._rng.getrandbits(32)

    def _new_request(self, request_id, prompt_ids, params, priority, arrival_time, final_only: bool = False
                     ) -> Request:
        if request_id in self.requests:
            raise RequestError("request_id", f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params)
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        req = Request(request_id, prompt_ids, params, priority, arrival_time)
        req.final_only = final_only
        req.max_len = len(prompt_ids) + max_tokens
        req.sampling_row = sampling_row(params)
        req.logit_bias = tuple(sorted(params.logit_bias.items())) if params.logit_bias else ()
        req.allowed = tuple(sorted(set(params.allowed_token_ids))) if params.allowed_token_ids else ()
        for i in range(params.n):
            # 64 bits, as vLLM's (torch's) generator seeds: a negative seed as its two's complement
            seed = ((params.seed + i) if params.seed is not None else self.draw_seed()) & 0xFFFFFFFFFFFFFFFF
            seq = Sequence(req, i, seed, self._arrivals)
            if self.tokenizer is not None and params.detokenize:
                # a request whose text is read once, at its end, and that no stop string can end is
                # decoded then, in one call (``lazy``): per token, the detokenizer was ~30 % of a decode
                # step's host time at 512 running requests (benchmarks/engine_host_time.py --final-only)
                seq.detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                    lazy=final_only and not params.stop)
            if params.logprobs is not None:
                seq.logprobs = []
            req.seqs.append(seq)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]          # the first prompt token has nothing before it
        self._arrivals += 1
        return req

    def add_request(self, request_id: str, prompt_ids, params: SamplingParams, *,
                    priority: int = 0, arrival_time: float | None = None, hold_kv: bool = False,
                    final_only: bool = False) -> Request:
        """Queue a request. ``hold_kv``: when it finishes keep its pages until ``release_kv``
        (a prefill whose KV another engine reads; one sequence only). ``final_only``: ``step()`` returns
        its output once, when it finishes (vLLM's ``RequestOutputKind.FINAL_ONLY``: ``LLM.generate``
        builds no output object per token)."""
        prompt_ids = list(prompt_ids)
        if hold_kv and params.n != 1:
            raise RequestError("n", "a request whose KV is held must have n=1")
        req = self._new_request(request_id, prompt_ids, params, priority, arrival_time, final_only)
        req.hold_kv = hold_kv
        if params.n > 1 and len(prompt_ids) > 1:
            req.seqs[0].fork_target = len(prompt_ids) - 1
            for s in req.seqs[1:]:
                s.blocked = True
            self._forking.add(request_id)
        self.requests[request_id] = req
        self.scheduler.add(req)
        self.metrics.prompt_tokens += len(prompt_ids)
        return req

    def abort(self, request_id: str, wire: bool = False) -> RequestOutput | tuple | None:
        """Stop a request wherever it is and free all it holds; returns its final output (``wire``: as
        ``step(wire=True)`` lays it out)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self._forking.discard(request_id)
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        req.metrics.finished_time = time.monotonic()
        self._count_finished(req)             # those already done by how they ended
        # the gauges now, not at the next step (without overlap, none may come: an abort of the last request)
        self._refresh_gauges()
        return self._make_wire(req) if wire else self._make_output(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._inflight is not None

    def reset_prefix_cache(self) -> int:
        """Drop every cached prefix no sequence holds (vLLM's ``reset_prefix_cache``, SGLang's ``flush_cache``),
        so later prompts compute their KV again; returns the pages freed (0 without a prefix cache). Pages that
        running or held sequences share stay theirs."""
        return 0 if self.prefix_cache is None else self.prefix_cache.clear()

    # ---- disaggregation: KV that leaves or arrives -----------------------------------------------

    def held_pages(self, request_id: str) -> list[int] | None:
        """Pages of a finished ``hold_kv`` request (its prompt's KV), until ``release_kv``."""
        seq = self.scheduler.held.get(request_id)
        return None if seq is None else list(seq.pages)

    def release_kv(self, request_id: str) -> None:
        self.scheduler.release(request_id)

    def reserve_kv(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Pages for ``num_tokens`` of KV computed elsewhere; None when they cannot be had now."""
        return self.scheduler.reserve(request_id, math.ceil(num_tokens / self.config.page_size))

    def unreserve_kv(self, request_id: str) -> None:
        self.scheduler.unreserve(request_id)

    def add_prefilled(self, request_id: str, prompt_ids, params: SamplingParams, *, seed: int,
                      first_token: int, first_logprobs: dict | None = None, priority: int = 0,
                      arrival_time: float | None = None, num_cached_tokens: int = 0) -> RequestOutput:
        """Continue a request whose prompt was computed elsewhere: its KV is already in the pages
        reserved for it (``reserve_kv``), its first token was drawn there. The token goes through
        the same stop checks as one drawn here; returns the output that carries it."""
        prompt_ids = list(prompt_ids)
        if request_id not in self.scheduler.reserved:
            raise RequestError("request_id", f"no pages reserved for {request_id!r}")
        if params.n != 1:
            self.scheduler.unreserve(request_id)
            raise RequestError("n", "a prefilled request must have n=1")
        params = dataclasses.replace(params, seed=seed)
        try:
            req = self._new_request(request_id, prompt_ids, params, priority, arrival_time)
        except RequestError:
            self.scheduler.unreserve(request_id)
            raise
        req.num_cached_tokens = num_cached_tokens
        seq = req.seqs[0]
        now = time.monotonic()
        req.metrics.first_scheduled_time = now
        self.requests[request_id] = req
        self.metrics.prompt_tokens += len(prompt_ids)
        self.scheduler.add_running(seq, self.scheduler.reserved.pop(request_id), len(prompt_ids))
        self._accept(seq, int(first_token), now, first_logprobs)
        out = self._make_output(req)
        if req.finished:
            self._retire(req, now)
        return out

    # ---- one step ------------------------------------------------------------------------------

    def _can_sample(self, seq: Sequence) -> bool:
        return seq.num_tokens < seq.request.max_len

    @property
    def host_time(self) -> float:
        """Seconds spent in step(), the wait for the device included (``metrics`` holds the two parts)."""
        return self.metrics.host_seconds + self.metrics.device_wait_seconds

    @property
    def wait_time(self) -> float:
        """Seconds step() spent waiting for the device's results."""
        return self.metrics.device_wait_seconds

    def gauges(self) -> dict:
        """Its queues and pages now (``EngineMetrics``' gauge fields, which ``step`` sets as it goes), for a reader
        on another thread (a worker's Health, the disaggregated server's /metrics of its prefill engine): the
        allocator's counts are not read at one instant, so a page being freed may count once too many for a moment,
        never below 0."""
        a = self.allocator
        return dict(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                    kv_pages_used=max(0, a.num_in_use), kv_pages_cached=max(0, a.num_cache_only),
                    kv_pages_total=a.num_pages)

    def step(self, wire: bool = False) -> list:
        """Schedule and dispatch the next step, then process the previous one's tokens: the outputs of
        the requests that got a token (``RequestOutput``; with ``wire`` each as its deltas only, the
        tuple ``jaxdyn.engine.process`` sends: no output objects are built)."""
        t0 = time.perf_counter()
        w0 = self.metrics.device_wait_seconds
        batch = self.scheduler.schedule(self._can_sample)
        handle = self._dispatch(batch) if batch.items else None
        outputs: list[RequestOutput] = []
        prev, self._inflight = self._inflight, ((batch, handle) if handle is not None else None)
        if prev is not None:
            outputs = self._process(*prev, wire)
        if handle is not None and not self.config.overlap:
            cur, self._inflight = self._inflight, None
            outputs += self._process(*cur, wire)
        self.metrics.steps += 1
        self.metrics.preemptions = self.scheduler.num_preemptions
        self._refresh_gauges()
        self.metrics.prefix_cache_queries = self.scheduler.prefix_queries
        self.metrics.prefix_cache_hits = self.scheduler.prefix_hits
        if self.prefix_cache is not None:
            self.metrics.prefix_cache_evictions = self.prefix_cache.num_evicted
        self.metrics.compilations_after_warmup = self.runner.compiles_while_serving
        r = self.runner
        self.metrics.step_tokens, self.metrics.step_token_rows, self.metrics.step_calls = (
            r.tokens_run, r.rows_run, r.calls_run)
        self.metrics.step_call_seconds = r.call_seconds
        self.metrics.host_seconds += time.perf_counter() - t0 - (self.metrics.device_wait_seconds - w0)
        return outputs

    def _dispatch(self, batch: SchedulerOutput) -> StepHandle:
        now = time.monotonic()
        if batch.copies:
            self.runner.copy_pages(batch.copies)
        work = []
        scored = 0
        metrics = self.metrics
        for idx, it in enumerate(batch.items):
            seq = it.seq
            req = seq.request
            p = req.params
            start = it.start
            end = start + it.num_tokens
            prompt_len = len(seq.prompt_ids)
            num_out = len(seq.output_ids)
            known = prompt_len + num_out
            if end <= known:
                toks, prev_row = seq.token_slice(start, end), -1
            elif start == known:   # decode: the one token is the previous step's draw, on the device
                toks, prev_row = [0], seq.pending_rows[-1]
            else:   # the last token is the previous step's draw, still on the device
                toks, prev_row = seq.token_slice(start, known) + [0], seq.pending_rows[-1]
            out_index = num_out + seq.num_pending
            banned = ()
            if it.samples and out_index < p.min_tokens:
                banned = self.eos_token_ids + tuple(p.stop_token_ids)
            pages = seq.pages
            cached = seq.page_array
            if cached is None or cached[0] is not pages or cached[1] != len(pages):
                cached = seq.page_array = (pages, len(pages), np.asarray(pages, np.int32))
            w = SequenceWork(toks, start, cached[2], prev_row, p, prompt_len,
                             seq.seed, out_index, banned, req.sampling_row,
                             req.logit_bias if it.samples else (), req.allowed if it.samples else ())
            if it.scored is not None:     # positions a..b-1 score the prompt tokens after them (Scheduler._chunk)
                a, b = it.scored
                w.scores, w.score_at = seq.prompt_ids[a + 1:b + 1], a - start
                scored += b - a
            work.append(w)
            if it.samples:
                seq.num_pending += 1
                seq.pending_rows.append(idx)
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                metrics.queue_time.observe(now - req.metrics.arrival_time)
            if start < prompt_len:
                metrics.computed_prefill_tokens += min(end, prompt_len) - start
        return self.runner.execute(work, scored=scored)

    def _process(self, batch: SchedulerOutput, handle: StepHandle, wire: bool = False) -> list:
        tw = time.perf_counter()
        res = handle.result()
        self.metrics.device_wait_seconds += time.perf_counter() - tw
        now = time.monotonic()
        next_ids = res.next_token_ids.tolist()
        touched: dict[str, Request] = {}
        if res.scores is not None:
            self._take_scores(batch, res.scores)
        for idx, it in enumerate(batch.items):
            if not it.samples:
                continue
            seq = it.seq
            seq.num_pending -= 1
            seq.pending_rows.popleft()
            if seq.status is SeqStatus.FINISHED:
                continue
            req = seq.request
            tok = next_ids[idx]
            entry = None
            if seq.logprobs is not None:
                entry = _logprob_entry(tok, res.logprobs[idx], res.top_ids[idx], res.top_logprobs[idx],
                                       req.params.logprobs)
            self._accept(seq, tok, now, entry)
            touched[req.request_id] = req
        outputs = []
        make = self._make_wire if wire else self._make_output
        for req in touched.values():
            done = req.finished
            if done or not req.final_only:
                outputs.append(make(req))
            if done:
                self._retire(req, now)
        return outputs

    def _take_scores(self, batch: SchedulerOutput, scores) -> None:
        """The step's scored prompt tokens into their requests' ``prompt_logprobs``, in the order ``_dispatch``
        laid their rows out (the items' ``scored`` positions in turn; steps are read in order)."""
        lps, top_ids, top_lps = (a.tolist() for a in scores)
        r = 0
        for it in batch.items:
            if it.scored is None:
                continue
            req = it.seq.request
            for pos in range(*it.scored):
                req.prompt_logprobs.append(_logprob_entry(req.prompt_ids[pos + 1], lps[r], top_ids[r], top_lps[r],
                                                          req.params.prompt_logprobs))
                r += 1

    def _accept(self, seq: Sequence, tok: int, now: float, entry: dict | None) -> None:
        """A drawn token joins its sequence: metrics, logprobs, stop checks."""
        req = seq.request
        seq.output_ids.append(tok)
        self.metrics.generation_tokens += 1
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
            self.metrics.ttft.observe(now - m.arrival_time)
        elif seq.index == 0 and m.last_token_time is not None:
            self.metrics.itl.observe(now - m.last_token_time)
        if seq.index == 0:
            m.last_token_time = now
        if seq.logprobs is not None and entry is not None:
            seq.cumulative_logprob += entry[tok].logprob
            seq.logprobs.append(entry)
        self._check_stop(seq, tok)

    def _refresh_gauges(self) -> None:
        """The running / waiting / KV page gauges as the scheduler and allocator stand. An n > 1 request's siblings
        blocked on their leader's prompt count where the leader is (vLLM's n children run together): as running
        while it runs, not as a queue on an idle engine."""
        waiting = self.scheduler.waiting
        with_leader = 0
        if self._forking:
            with_leader = sum(1 for s in waiting if s.blocked and s.request.seqs[0].status is SeqStatus.RUNNING)
        self.metrics.num_running = len(self.scheduler.running) + with_leader
        self.metrics.num_waiting = len(waiting) - with_leader
        self.metrics.kv_pages_used = self.allocator.num_in_use
        self.metrics.kv_pages_cached = self.allocator.num_cache_only

    def _retire(self, req: Request, now: float) -> None:
        self.requests.pop(req.request_id, None)
        self._forking.discard(req.request_id)
        req.metrics.finished_time = now
        self.metrics.e2e.observe(now - req.metrics.arrival_time)
        self._count_finished(req)

    def _count_finished(self, req: Request) -> None:
        """``requests_finished`` (``jaxdyn:request_success``) counts sequences, by finish reason."""
        done = self.metrics.requests_finished
        for s in req.seqs:
            done[s.finish_reason] = done.get(s.finish_reason, 0) + 1

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        req = seq.request
        p = req.params
        n_out = len(seq.output_ids)
        reason, stop_reason = None, None
        if not p.ignore_eos and tok in self.eos_token_ids and n_out > p.min_tokens - 1:
            reason = "stop"
            if self._own_eos is not None and tok != self._own_eos:
                stop_reason = tok
        elif tok in p.stop_token_ids and n_out >= p.min_tokens:
            reason, stop_reason = "stop", tok
        if seq.detok is not None and (reason is None or p.include_stop_str_in_output):
            # The EOS or stop token that ends the sequence stays out of the text (vLLM: unless
            # include_stop_str_in_output); it stays in the token ids. A stop string counts from the token after the
            # first min_tokens on, and must end in that token's text or later (vLLM V1's detokenizer)
            matched = seq.detok.add(tok, check_stop=reason is None and n_out > p.min_tokens)
            if matched is not None:
                reason, stop_reason = "stop", matched
        if reason is None and len(seq.prompt_ids) + n_out >= req.max_len:
            reason = "length"
        if reason is not None:
            if seq.detok is not None:
                # the held text (a token's text ending in part of a character) may complete a stop string, whatever
                # ended the sequence (length, an EOS or a stop token after it): a stop string then, its text cut
                seq.detok.flush(check_stop=n_out > p.min_tokens)
                if seq.detok.stopped_by is not None:
                    reason, stop_reason = "stop", seq.detok.stopped_by
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self.scheduler.finish(seq, hold=req.hold_kv)

    def _seq_delta(self, seq: Sequence) -> tuple[str, list[int], list | None]:
        """What ``seq`` has that its previous output did not (text held back for a stop string stays held):
        (delta text, delta token ids, delta logprobs); marks it emitted."""
        done = seq.finished
        detok = seq.detok
        delta_text = ""
        if detok is not None:
            if done:
                detok.flush()
            delta_text = detok.take_delta(done)
        delta_ids = seq.output_ids[seq.emitted_tokens:]
        seq.emitted_tokens = len(seq.output_ids)
        delta_lps = None
        if seq.logprobs is not None:
            delta_lps = seq.logprobs[seq.emitted_logprobs:]
            seq.emitted_logprobs = len(seq.logprobs)
        return delta_text, delta_ids, delta_lps

    def _make_wire(self, req: Request) -> tuple:
        """A request's output as its deltas only, the layout ``jaxdyn.engine.process`` sends (no objects):
        (request id, finished, cached tokens, error, metrics, [(index, delta text, delta ids, cumulative
        logprob, delta logprobs, finish reason, stop reason) per sequence]). The request's timings
        (``RequestMetrics``) go with its final output only: pickling them every step cost more than the
        rest of a decode output (0.45 against 0.16 ms a step at 256 running, CPU)."""
        outs = []
        for seq in req.seqs:
            delta_text, delta_ids, delta_lps = self._seq_delta(seq)
            outs.append((seq.index, delta_text, delta_ids,
                         seq.cumulative_logprob if seq.logprobs is not None else None, delta_lps,
                         seq.finish_reason, seq.stop_reason))
        done = req.finished
        return (req.request_id, done, req.num_cached_tokens, None, req.metrics if done else None, outs,
                self._prompt_logprobs(req, once=True))

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            delta_text, delta_ids, delta_lps = self._seq_delta(seq)
            text = TextPrefix(*seq.detok.streamed()) if seq.detok is not None else ""
            num_out = len(seq.output_ids)
            outs.append(CompletionOutput(
                seq.index, text, TokenPrefix(seq.output_ids, num_out), delta_text, delta_ids,
                seq.cumulative_logprob if seq.logprobs is not None else None,
                seq.logprobs, delta_lps, seq.finish_reason, seq.stop_reason))
        return RequestOutput(req.request_id, req.prompt_ids, outs, req.finished,
                             req.num_cached_tokens, req.metrics, prompt_logprobs=self._prompt_logprobs(req))

    @staticmethod
    def _prompt_logprobs(req: Request, once: bool = False) -> list | None:
        """``req``'s prompt logprobs for its output, once all are in: in the first output after that and in its
        final one (``once``: the first only, for the engine process, whose other side keeps them)."""
        plps = req.prompt_logprobs
        if plps is None or len(plps) < len(req.prompt_ids):
            return None
        if req.prompt_logprobs_sent and (once or not req.finished):
            return None
        req.prompt_logprobs_sent = True
        return plps


def _logprob_entry(tok: int, lp, top_ids, top_lps, k: int) -> dict[int, Logprob]:
    """A token's logprob entry from a sampler row: the token's own raw logprob and vocabulary rank (``RANK_COL``),
    and the ``k`` most likely ids beside it, ranked. With ``k`` above the vocabulary the sampler pads the list with
    id 0 at -inf: a pad never replaces an id listed before it (token 0 read -inf)."""
    entry = {tok: Logprob(float(lp), int(top_ids[RANK_COL]))}
    for rank, (tid, tlp) in enumerate(zip(top_ids[:k], top_lps[:k]), 1):
        tid = int(tid)
        if tid not in entry:
            entry[tid] = Logprob(float(tlp), rank)
    return entry


def check_gpu_kernel_shapes(page_size: int, head_dim: int) -> None:
    """The GPU attention kernels (Pallas on Triton) take array sizes that are powers of two: a page size or head_dim
    of another size is refused when the engine is built (it failed in the warm-up's lowering, naming neither)."""
    if page_size & (page_size - 1):
        raise ValueError(f"page_size {page_size}: the GPU attention kernels (Pallas on Triton) take powers of two "
                         f"only; use a page size of 8, 16, 32, ...")
    if head_dim & (head_dim - 1):
        raise ValueError(f"this model's head_dim {head_dim}: the GPU attention kernels (Pallas on Triton) take powers "
                         f"of two only (64, 128, ...); it cannot be served on a GPU")


def settle_heap() -> None:
    """Collect, then freeze what is left (``gc.freeze``: the objects alive now move to a generation the
    collector never scans, so a full collection later costs what was made since), as vLLM's engine does after
    its start-up; for a serving process, once the model is loaded and compiled. The thresholds stay Python's:
    a larger youngest generation makes fewer, longer pauses (20,000 instead of 700: one of 15 ms in an offline
    run on the CPU instead of a hundred of 0.1-0.6 ms), and a pause longer than the step in flight idles the
    device. Process-wide: frozen objects are never collected even if they become cyclic garbage later, so it
    first unfreezes what an earlier call froze (an engine built before, in a cycle and dropped since, is then
    collected here)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _check_buckets_hold(config: EngineConfig, max_model_len: int) -> None:
    """ValueError where the given buckets cannot hold a step the engine schedules: the largest token bucket below
    ``max_num_batched_tokens``, or the largest page bucket below a sequence of ``max_model_len`` tokens (the step
    that needs it would fail in the middle of serving, ending every request)."""
    if config.token_buckets and max(config.token_buckets) < config.max_num_batched_tokens:
        raise ValueError(f"token_buckets: the largest ({max(config.token_buckets)}) must be at least "
                         f"max_num_batched_tokens ({config.max_num_batched_tokens}), the tokens a step may hold")
    pages = max(1, -(-(max_model_len - 1) // config.page_size))     # the last token's KV is never computed
    if config.page_buckets and max(config.page_buckets) < pages:
        raise ValueError(f"page_buckets: the largest ({max(config.page_buckets)}) must be at least the {pages} pages "
                         f"of {config.page_size} tokens a sequence of max_model_len {max_model_len} takes (add a "
                         "larger bucket, or give a lower max_model_len)")


def engine_eos_ids(model_config, tokenizer, eos_token_ids=None) -> tuple[int, ...]:
    """The ids that end a sequence (``EngineCore.eos_token_ids``): ``eos_token_ids`` if given, else the model
    config's and the tokenizer's EOS ids. Ids outside the vocabulary (a config's negative or too-large id, which
    transformers only warns of) are left out: never drawn, and banned until min_tokens a negative one would index
    another token's logit from the end."""
    eos = set(model_config.eos_token_ids) if eos_token_ids is None else set(eos_token_ids)
    if tokenizer is not None and eos_token_ids is None:
        eos |= set(tokenizer.eos_token_ids)
    return tuple(sorted(t for t in eos if 0 <= t < model_config.vocab_size))


def check_request(facts, prompt_ids, params: SamplingParams) -> None:
    """Raise RequestError if an engine with these ``facts`` would refuse the request: anything with an
    EngineCore's ``model_config``, ``max_model_len``, ``tokenizer``, ``eos_token_ids``, ``config`` and
    ``num_pages`` (the core itself, or the view of a core in another process)."""
    check_request_ids(facts, prompt_ids, params)
    if params.prompt_logprobs is not None and len(prompt_ids) > 1:
        cfg = facts.config
        if min(cfg.max_num_seqs, cfg.max_num_batched_tokens) < 2:
            raise RequestError("prompt_logprobs", "a step of this engine holds one row (max_num_seqs or "
                               "max_num_batched_tokens 1): a prompt token's score needs a row beside its sequence's")
    room = facts.max_model_len - len(prompt_ids)
    max_len = len(prompt_ids) + (room if params.max_tokens is None else min(params.max_tokens, room))
    # KV is computed for every token but the last (sampled, never fed back)
    held = facts.num_pages * facts.config.page_size
    if len(prompt_ids) > held:
        raise RequestError("prompt", f"the prompt has {len(prompt_ids)} tokens; the KV cache holds {held}")
    if max_len - 1 > held:
        raise RequestError("max_tokens", f"prompt + max_tokens = {max_len} tokens: the KV of {max_len - 1} of them "
                           f"exceeds the KV cache ({held} tokens)")


def check_request_ids(facts, prompt_ids, params: SamplingParams) -> None:
    """The part of ``check_request`` that needs no engine's pages or step shape: the prompt against the vocabulary
    and the context, the parameters' token ids against the vocabulary and the room the bans until min_tokens
    share (``facts``: ``model_config``, ``max_model_len``, ``tokenizer``, ``eos_token_ids``). A front end over
    workers checks this much itself, so that a streamed request it would have the worker refuse is a 400, not an
    error event after a 200."""
    if len(prompt_ids) == 0:
        raise RequestError("prompt", "the prompt is empty")
    vocab = facts.model_config.vocab_size
    ids = np.asarray(prompt_ids) if len(prompt_ids) > 16 else None     # one pass in numpy for long prompts
    if ids is not None and ids.ndim == 1 and ids.dtype.kind in "iu":
        if ids.min() < 0 or ids.max() >= vocab:
            raise RequestError("prompt", f"token ids must be integers in [0, {vocab})")
    elif any(not isinstance(t, (int, np.integer)) or t < 0 or t >= vocab for t in prompt_ids):
        raise RequestError("prompt", f"token ids must be integers in [0, {vocab})")
    if len(prompt_ids) >= facts.max_model_len:
        raise RequestError("prompt", f"the prompt has {len(prompt_ids)} tokens; this model's context "
                           f"is {facts.max_model_len} tokens and at least one must be left to generate")
    room = facts.max_model_len - len(prompt_ids)
    if params.min_tokens > room:
        # a request ends at the context's end whatever its max_tokens (vLLM caps max_tokens there, then refuses
        # a min_tokens above it)
        raise RequestError("min_tokens", f"min_tokens ({params.min_tokens}) exceeds the {room} tokens the context "
                           f"leaves after the prompt ({len(prompt_ids)} of {facts.max_model_len})")
    if any(t >= vocab for t in params.stop_token_ids):
        raise RequestError("stop_token_ids", f"token ids must be in [0, {vocab})")
    if params.stop and facts.tokenizer is None:
        raise RequestError("stop", "stop strings need a tokenizer; this model has none")
    # the ids a row bans until min_tokens, as the engine's step bans them: EOS with ignore_eos too (vLLM bans every
    # stop id, the model's EOS ids included, until min_tokens whatever ignore_eos says)
    ban_ids = tuple(facts.eos_token_ids) + tuple(params.stop_token_ids) if params.min_tokens else ()
    bans = len(ban_ids)
    if bans > MAX_BANNED:
        raise RequestError("stop_token_ids", f"at most {MAX_BANNED} EOS and stop ids with min_tokens")
    if params.logit_bias:
        if any(t >= vocab for t in params.logit_bias):
            raise RequestError("logit_bias", f"token ids must be in [0, {vocab})")
        if bans + len(params.logit_bias) > MAX_BANNED:
            raise RequestError("logit_bias", f"at most {MAX_BANNED - bans} token ids with min_tokens and these "
                               f"EOS and stop ids ({bans}), {MAX_BANNED} in all")
    if params.allowed_token_ids:
        if any(t >= vocab for t in params.allowed_token_ids):
            raise RequestError("allowed_token_ids", f"token ids must be in [0, {vocab})")
        taken = bans + len(params.logit_bias or ())
        room = MAX_BANNED - 1 - taken
        if room < 1:
            raise RequestError("allowed_token_ids", f"no room: logit_bias and min_tokens' bans take {taken} of the "
                               f"{MAX_BANNED} entries a request's ids share (allowed_token_ids needs one more "
                               "besides its ids)")
        if len(set(params.allowed_token_ids)) > room:
            raise RequestError("allowed_token_ids", f"at most {room} distinct token ids beside logit_bias's and "
                               f"min_tokens' ({taken}): {MAX_BANNED - 1} in all")
        if set(params.allowed_token_ids) <= set(ban_ids):
            raise RequestError("allowed_token_ids", "every allowed id is an EOS or stop id, banned until min_tokens "
                               f"({params.min_tokens}) tokens: nothing could be drawn")


def unloaded_bytes_per_device(state, mesh) -> int:
    """Bytes one device will hold of the weights of ``state`` that are not arrays yet (``ShapeDtypeStruct``
    leaves of an abstract state), in their shardings over ``mesh``."""
    from jaxdyn.parallel.sharding import param_shardings
    return sum(math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(param_shardings(state, mesh)))
               if not isinstance(leaf, jax.Array))


def _kv_heads_per_device(model_config, mesh) -> int:
    """The kv heads each device's cache holds: the stored heads split over the model axis, or, when there are
    fewer than its devices, the one each device keeps a copy of (``stored_kv_heads``)."""
    from jaxdyn.parallel.sharding import model_parallel_size, stored_kv_heads
    tp = model_parallel_size(mesh)
    kv_heads = stored_kv_heads(model_config.num_kv_heads, tp)
    return kv_heads // tp if kv_heads >= tp else kv_heads


def _kernel_page_limit(model_config, mesh, page_size: int) -> int:
    """The most pages the GPU attention kernels address for this model on this mesh
    (``paged_decode.max_kernel_pages`` of one device's kv heads)."""
    from pallas_kernels.paged_decode import max_kernel_pages
    return max_kernel_pages(_kv_heads_per_device(model_config, mesh), page_size, model_config.head_dim)


def _default_num_pages(state, model_config, mesh, config: EngineConfig, max_model_len: int) -> int:
    ps = config.page_size
    stats = gpu_memory_stats(mesh)
    if "bytes_limit" in stats:
        # weights not loaded yet (an abstract state) will take their share of the device too
        free = (stats["bytes_limit"] * config.kv_memory_fraction - stats.get("bytes_in_use", 0)
                - unloaded_bytes_per_device(state, mesh))
        return max(int(free // _kv_page_bytes_per_device(state, model_config, mesh, config)),
                   math.ceil(max_model_len / ps))
    # CPU: room for max_num_seqs sequences of 1k tokens, and at least one of max_model_len.
    return max(math.ceil(max_model_len / ps), math.ceil(config.max_num_seqs * 1024 / ps))


def _kv_page_bytes_per_device(state, model_config, mesh, config: EngineConfig) -> int:
    dtype = kv_cache_dtype(jax.tree.leaves(state)[0].dtype, mesh, config.kv_cache_dtype)
    return (2 * model_config.num_layers * _kv_heads_per_device(model_config, mesh) * config.page_size
            * model_config.head_dim * dtype.itemsize)


def _host_available_bytes() -> int | None:
    """The host's available memory (Linux ``MemAvailable``), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_kv_fits(num_pages: int, state, model_config, mesh, config: EngineConfig) -> None:
    """ValueError naming the sizes when a KV pool of ``num_pages`` cannot be allocated: more than a GPU's memory
    limit less what it holds and the weights still to load, or on the CPU (all devices in the host's memory) more
    than the host has available -- instead of an allocation failure, or the process killed for memory."""
    dev = mesh.devices.flat[0]
    per_page = _kv_page_bytes_per_device(state, model_config, mesh, config)
    need = num_pages * per_page
    weights = unloaded_bytes_per_device(state, mesh)
    if dev.platform == "gpu":
        stats = gpu_memory_stats(mesh)
        if "bytes_limit" not in stats:
            return
        avail = stats["bytes_limit"] - stats.get("bytes_in_use", 0) - weights
        where = "a device has"
    elif dev.platform == "cpu":
        host = _host_available_bytes()
        if host is None:
            return
        n = mesh.devices.size
        need, avail = need * n, host - weights * n
        where = "the host has"
    else:
        return
    if need > avail:
        raise ValueError(f"a KV cache of {num_pages} pages of {config.page_size} tokens needs {need / 2**30:.2f} GiB; "
                         f"{where} {max(avail, 0) / 2**30:.2f} GiB free for it: use fewer pages (num_pages) or a "
                         "smaller page size")
