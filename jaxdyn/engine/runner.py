"""The model runner: turns one step's work into bucketed arrays and runs a compiled step.

Shapes come from two explicit bucket lists, tokens per step and pages per
sequence; the sequences per step follow the token bucket (``min(tokens,
max_num_seqs)``), which keeps the number of compiled shapes small. ``warmup()``
compiles the step once per bucket pair ahead of time
(``jit(...).lower(...).compile()``); a step calls the executable of its bucket,
so nothing can compile while serving. With ``fail_on_compile`` (on in tests) a
step that observes any compilation in the process after warm-up raises
``CompiledAfterWarmupError``.

Device state the runner owns and donates into every step (updated in place):
the KV pages, and ``token_pages`` (i32[num_pages, page_size]), the token id at
each cached position, which the sampler reads for penalties.

A step is dispatched without waiting (``execute`` returns a handle); a
sequence whose next input is the token the previous step sampled names that
step's row (``prev_row``) and the token is taken on the device, so the host
can schedule and dispatch step N+1 before it has read step N's tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxdyn.engine.compilation import CompiledAfterWarmupError, compilation_count
from jaxdyn.engine.sampler import SamplingArrays, sample
from jaxdyn.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from jaxdyn.kv.cache import AttentionMetadata, KVCacheSpec, allocate_kv_cache
from jaxdyn.parallel.sharding import (
    kv_cache_partition_spec, model_parallel_size, param_shardings, replicated, stored_kv_heads)

MAX_BANNED = 32    # ids a row may ban at once (EOS ids + stop_token_ids under min_tokens)


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2lo, 4lo, ... up to and including hi (hi itself always ends the list)."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


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

    def __post_init__(self):
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError("max_num_seqs cannot exceed max_num_batched_tokens")

    def buckets(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        max_pages = -(-self.max_model_len // self.page_size)
        tokens = self.token_buckets or powers_of_two(min(16, self.max_num_batched_tokens),
                                                     self.max_num_batched_tokens)
        pages = self.page_buckets or powers_of_two(min(4, max_pages), max_pages)
        return tuple(sorted(tokens)), tuple(sorted(pages))

    def seqs_for(self, token_bucket: int) -> int:
        return min(token_bucket, self.max_num_seqs)


@dataclasses.dataclass(frozen=True)
class SequenceWork:
    """One sequence's share of a step: a prefill chunk or a single decode token."""

    token_ids: Sequence[int]   # tokens to compute now
    num_computed: int          # tokens of this sequence already in the cache
    page_ids: Sequence[int]    # its pages, covering num_computed + len(token_ids) tokens
    prev_row: int = -1         # >= 0: the last token is the previous step's sample of this row
    params: SamplingParams | None = None   # None: greedy
    prompt_len: int = 0        # for penalties: positions before this are the prompt
    seed: int = 0
    output_index: int = 0      # index in the output of the token this row draws
    banned: Sequence[int] = ()


@dataclasses.dataclass
class StepOutput:
    next_token_ids: np.ndarray          # i32[num_seqs] token drawn after each sequence's last token
    logprobs: np.ndarray | None = None  # f32[num_seqs] raw logprob of that token
    top_ids: np.ndarray | None = None   # i32[num_seqs, MAX_LOGPROBS]
    top_logprobs: np.ndarray | None = None
    logits: np.ndarray | None = None    # f32[num_seqs, vocab] when RunnerConfig.return_logits


class StepHandle:
    """A dispatched step; ``result()`` waits for it and copies what was asked to the host."""

    def __init__(self, runner, n, ids, lps, top_ids, top_lps, logits, want_logprobs):
        self._runner, self.n = runner, n
        self._ids, self._lps, self._top_ids, self._top_lps, self._logits = ids, lps, top_ids, top_lps, logits
        self._want = want_logprobs
        self._out: StepOutput | None = None

    def result(self) -> StepOutput:
        if self._out is None:
            n = self.n
            out = StepOutput(np.asarray(self._ids)[:n])
            if self._want:
                out.logprobs = np.asarray(self._lps)[:n]
                out.top_ids = np.asarray(self._top_ids)[:n]
                out.top_logprobs = np.asarray(self._top_lps)[:n]
            if self._logits is not None:
                out.logits = np.asarray(self._logits)[:n]
            self._out = out
            self._runner._check_no_compile()
        return self._out


def _pick(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what}={n} exceeds the largest bucket {buckets[-1]}")


_GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


class ModelRunner:
    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, mesh: Mesh, config: RunnerConfig):
        self.graphdef = graphdef
        self.state = state
        self.mesh = mesh
        self.config = config
        model_cfg = nnx.merge(graphdef, state).config
        self.model_config = model_cfg
        self.kv_spec = KVCacheSpec(
            num_layers=model_cfg.num_layers,
            num_kv_heads=stored_kv_heads(model_cfg.num_kv_heads, model_parallel_size(mesh)),
            num_pages=config.num_pages,
            page_size=config.page_size,
            head_dim=model_cfg.head_dim,
            dtype=jax.tree.leaves(state)[0].dtype,
        )
        self._replicated = replicated(mesh)
        self.kv_cache = allocate_kv_cache(self.kv_spec, mesh)
        self.token_pages = jax.device_put(
            np.zeros((config.num_pages, config.page_size), np.int32), self._replicated)
        self.token_buckets, self.page_buckets = config.buckets()
        self.max_rows = config.max_num_seqs
        self.prev_sampled = jax.device_put(np.zeros(self.max_rows, np.int32), self._replicated)
        self._compiled: dict[tuple[int, int], jax.stages.Compiled] = {}
        self._copy_compiled = None
        self._compiles_at_warmup: int | None = None
        self._jitted = self._make_jitted()
        self._copy_jitted = self._make_copy()

    # ---- compilation -------------------------------------------------------------------------

    def _kv_shardings(self):
        kv_sharding = jax.sharding.NamedSharding(
            self.mesh, kv_cache_partition_spec(self.mesh, self.kv_spec.num_kv_heads))
        return [(kv_sharding, kv_sharding)] * self.kv_spec.num_layers

    def _make_jitted(self):
        graphdef, return_logits = self.graphdef, self.config.return_logits
        max_rows, page_size = self.max_rows, self.config.page_size

        def step(state, kv_cache, token_pages, prev_sampled, host_tokens, token_src, md,
                 logits_rows, sp: SamplingArrays):
            token_ids = jnp.where(token_src >= 0, prev_sampled[jnp.maximum(token_src, 0)], host_tokens)
            token_pages = token_pages.at[md.slot_page, md.slot_offset].set(token_ids, mode="drop")
            model = nnx.merge(graphdef, state)
            kv_cache, hidden = model(kv_cache, token_ids, md)
            logits = model.compute_logits(hidden[logits_rows])        # f32[S, vocab]
            S, P = md.page_table.shape

            def history():
                h = token_pages[md.page_table].reshape(S, P * page_size)
                pos = jnp.arange(P * page_size)[None, :]
                return h, pos < md.kv_lens[:, None], pos >= sp.prompt_lens[:, None]

            ids, lps, top_ids, top_lps = sample(logits, history, sp)
            sampled = jnp.zeros(max_rows, jnp.int32).at[:S].set(ids[:max_rows])
            return (kv_cache, token_pages, sampled, lps, top_ids, top_lps,
                    logits if return_logits else None)

        kv = self._kv_shardings()
        rep = self._replicated
        return jax.jit(
            step,
            in_shardings=(param_shardings(self.state, self.mesh), kv, rep, rep, rep, rep, rep, rep, rep),
            out_shardings=(kv, rep, rep, rep, rep, rep, rep),
            donate_argnums=(1, 2),
        )

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
        """Every (tokens, seqs, pages) shape warm-up compiles."""
        return [(t, self.config.seqs_for(t), p) for t in self.token_buckets for p in self.page_buckets]

    def warmup(self) -> float:
        """Compile every bucket; returns the seconds it took."""
        t0 = time.perf_counter()
        for t, _, p in self.bucket_shapes():
            self._compile(t, p)
        self._compile_copy()
        self._compiles_at_warmup = compilation_count()
        return time.perf_counter() - t0

    def _compile(self, t: int, p: int) -> jax.stages.Compiled:
        if (t, p) not in self._compiled:
            s = self.config.seqs_for(t)
            i32, f32 = jnp.int32, jnp.float32
            sd = jax.ShapeDtypeStruct
            md = AttentionMetadata(
                positions=sd((t,), i32), slot_page=sd((t,), i32), slot_offset=sd((t,), i32),
                page_table=sd((s, p), i32), kv_lens=sd((s,), i32), cu_q_lens=sd((s + 1,), i32))
            b = sd((), jnp.bool_)
            sp = SamplingArrays(sd((s,), f32), sd((s,), i32), sd((s,), f32), sd((s,), f32),
                                sd((s,), f32), sd((s,), f32), sd((s,), f32), sd((s,), i32),
                                sd((s,), jnp.uint32), sd((s,), i32), sd((s, MAX_BANNED), i32), b, b, b, b)
            self._compiled[(t, p)] = self._jitted.lower(
                self.state, self.kv_cache, self.token_pages, self.prev_sampled,
                sd((t,), i32), sd((t,), i32), md, sd((s,), i32), sp).compile()
        return self._compiled[(t, p)]

    def _compile_copy(self):
        if self._copy_compiled is None:
            c = jax.ShapeDtypeStruct((self.config.max_copies,), jnp.int32)
            self._copy_compiled = self._copy_jitted.lower(self.kv_cache, self.token_pages, c, c).compile()
        return self._copy_compiled

    # ---- page copies (copy-on-write) ---------------------------------------------------------

    def copy_pages(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy page ``src`` to ``dst`` for each pair (K, V and token ids), in stream order."""
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

    def execute(self, work: Sequence[SequenceWork]) -> StepHandle:
        """Dispatch one step; returns at once with a handle to its results."""
        if not work:
            raise ValueError("a step needs at least one sequence")
        cfg, page_size = self.config, self.config.page_size
        if len(work) > cfg.max_num_seqs:
            raise ValueError(f"{len(work)} sequences exceed max_num_seqs={cfg.max_num_seqs}")
        num_tokens = sum(len(w.token_ids) for w in work)
        t = _pick(self.token_buckets, num_tokens, "tokens per step")
        s = cfg.seqs_for(t)
        p = _pick(self.page_buckets, max(len(w.page_ids) for w in work), "pages per sequence")

        token_ids = np.zeros(t, np.int32)
        token_src = np.full(t, -1, np.int32)
        positions = np.zeros(t, np.int32)
        slot_page = np.full(t, cfg.num_pages, np.int32)      # out of range: dropped on write
        slot_offset = np.zeros(t, np.int32)
        page_table = np.zeros((s, p), np.int32)
        kv_lens = np.zeros(s, np.int32)
        cu_q_lens = np.full(s + 1, num_tokens, np.int32)
        logits_rows = np.zeros(s, np.int32)
        temperature = np.zeros(s, np.float32)
        top_k = np.zeros(s, np.int32)
        top_p = np.ones(s, np.float32)
        min_p = np.zeros(s, np.float32)
        rep = np.ones(s, np.float32)
        pres = np.zeros(s, np.float32)
        freq = np.zeros(s, np.float32)
        prompt_lens = np.zeros(s, np.int32)
        seeds = np.zeros(s, np.uint32)
        out_index = np.zeros(s, np.int32)
        banned = np.full((s, MAX_BANNED), -1, np.int32)
        use_pen = use_filt = use_rand = want_lp = False
        row = 0
        for i, w in enumerate(work):
            n = len(w.token_ids)
            if n == 0:
                raise ValueError(f"sequence {i} has no tokens to compute")
            end = w.num_computed + n
            pages = w.page_ids
            if len(pages) * page_size < end:
                raise ValueError(f"sequence {i}: {len(pages)} pages cannot hold {end} tokens")
            token_ids[row:row + n] = w.token_ids
            if w.prev_row >= 0:
                token_src[row + n - 1] = w.prev_row
            pos = np.arange(w.num_computed, end, dtype=np.int32)
            positions[row:row + n] = pos
            pages_arr = np.asarray(pages, np.int32)
            slot_page[row:row + n] = pages_arr[pos // page_size]
            slot_offset[row:row + n] = pos % page_size
            page_table[i, :len(pages)] = pages_arr
            kv_lens[i] = end
            cu_q_lens[i] = row
            row += n
            logits_rows[i] = row - 1
            sp = w.params
            if sp is not None:
                temperature[i] = sp.temperature
                if sp.temperature > 0:
                    use_rand = True
                    if sp.uses_filters:
                        use_filt = True
                        top_k[i], top_p[i], min_p[i] = sp.top_k, sp.top_p, sp.min_p
                if sp.uses_penalties:
                    use_pen = True
                    rep[i], pres[i], freq[i] = sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty
                if sp.logprobs:
                    want_lp = True
                elif sp.logprobs == 0:
                    want_lp = True
            prompt_lens[i] = w.prompt_len
            seeds[i] = w.seed & 0xFFFFFFFF
            out_index[i] = w.output_index
            if w.banned:
                if len(w.banned) > MAX_BANNED:
                    raise ValueError(f"sequence {i}: more than {MAX_BANNED} banned ids")
                banned[i, :len(w.banned)] = w.banned
        if (slot_page[:num_tokens] >= cfg.num_pages).any() or (slot_page[:num_tokens] < 0).any():
            raise ValueError(f"page id out of range [0, {cfg.num_pages})")

        md = AttentionMetadata(positions, slot_page, slot_offset, page_table, kv_lens, cu_q_lens)
        sa = SamplingArrays(temperature, top_k, top_p, min_p, rep, pres, freq, prompt_lens, seeds,
                            out_index, banned, np.bool_(use_pen), np.bool_(use_filt),
                            np.bool_(use_rand), np.bool_(want_lp))
        args = jax.device_put((token_ids, token_src, md, logits_rows, sa), self._replicated)
        compiled = self._compile(t, p)
        (self.kv_cache, self.token_pages, sampled, lps, top_ids, top_lps, logits) = compiled(
            self.state, self.kv_cache, self.token_pages, self.prev_sampled, *args)
        self.prev_sampled = sampled
        return StepHandle(self, len(work), sampled, lps, top_ids, top_lps, logits, want_lp)

    def step(self, work: Sequence[SequenceWork]) -> StepOutput:
        """Dispatch one step and wait for it (greedy unless the work says otherwise)."""
        return self.execute(work).result()

    def _check_no_compile(self) -> None:
        if (self.config.fail_on_compile and self._compiles_at_warmup is not None
                and compilation_count() != self._compiles_at_warmup):
            new = compilation_count() - self._compiles_at_warmup
            self._compiles_at_warmup = compilation_count()
            raise CompiledAfterWarmupError(f"{new} XLA compilation(s) after warm-up")
