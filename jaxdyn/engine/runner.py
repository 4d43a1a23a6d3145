"""The model runner: turns one step's work into bucketed arrays and runs a compiled step.

Shapes come from three explicit bucket lists (tokens per step, sequences per
step, pages per sequence). ``warmup()`` compiles the step once per bucket
combination ahead of time (``jit(...).lower(...).compile()``); a step then
calls the compiled executable of its bucket, so nothing can compile while
serving. With ``fail_on_compile`` set (on in tests) a step that observes any
compilation in the process after warm-up raises ``CompiledAfterWarmupError``.

The KV cache is donated into every step and comes back updated in place.
Sampling here is greedy argmax inside the step; only the sampled ids (and,
when asked, the logits of each sequence's last token) return to the host.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxdyn.engine.compilation import CompiledAfterWarmupError, compilation_count
from jaxdyn.kv.cache import AttentionMetadata, KVCacheSpec, allocate_kv_cache
from jaxdyn.parallel.sharding import (
    kv_cache_partition_spec, param_shardings, replicated, stored_kv_heads, model_parallel_size)


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
    max_num_seqs: int = 32                 # sequences per step (largest sequence bucket)
    max_model_len: int = 2048              # tokens per sequence (sets the largest page bucket)
    token_buckets: tuple[int, ...] | None = None   # default: powers of two from 16
    seq_buckets: tuple[int, ...] | None = None     # default: powers of two from 1
    page_buckets: tuple[int, ...] | None = None    # default: powers of two from 4
    return_logits: bool = False            # also bring back each sequence's last-token logits
    fail_on_compile: bool = False          # raise if anything compiles after warm-up

    def buckets(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        max_pages = -(-self.max_model_len // self.page_size)
        tokens = self.token_buckets or powers_of_two(min(16, self.max_num_batched_tokens),
                                                     self.max_num_batched_tokens)
        seqs = self.seq_buckets or powers_of_two(1, self.max_num_seqs)
        pages = self.page_buckets or powers_of_two(min(4, max_pages), max_pages)
        return tuple(sorted(tokens)), tuple(sorted(seqs)), tuple(sorted(pages))


@dataclasses.dataclass(frozen=True)
class SequenceWork:
    """One sequence's share of a step: a prefill chunk or a single decode token."""

    token_ids: Sequence[int]   # tokens to compute now
    num_computed: int          # tokens of this sequence already in the cache
    page_ids: Sequence[int]    # its pages, covering num_computed + len(token_ids) tokens


@dataclasses.dataclass
class StepOutput:
    next_token_ids: np.ndarray          # i32[num_seqs] greedy token after each sequence's last token
    logits: np.ndarray | None           # f32[num_seqs, vocab] when RunnerConfig.return_logits


def _pick(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what}={n} exceeds the largest bucket {buckets[-1]}")


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
        self.kv_cache = allocate_kv_cache(self.kv_spec, mesh)
        self.token_buckets, self.seq_buckets, self.page_buckets = config.buckets()
        self._compiled: dict[tuple[int, int, int], jax.stages.Compiled] = {}
        self._compiles_at_warmup: int | None = None
        self._replicated = replicated(mesh)
        self._jitted = self._make_jitted()

    # ---- compilation -------------------------------------------------------------------------

    def _make_jitted(self):
        graphdef, return_logits = self.graphdef, self.config.return_logits

        def step(state, kv_cache, token_ids, md, logits_rows):
            model = nnx.merge(graphdef, state)
            kv_cache, hidden = model(kv_cache, token_ids, md)
            logits = model.compute_logits(hidden[logits_rows])        # f32[S, vocab]
            next_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return kv_cache, next_ids, (logits if return_logits else None)

        kv_sharding = jax.sharding.NamedSharding(
            self.mesh, kv_cache_partition_spec(self.mesh, self.kv_spec.num_kv_heads))
        kv_shardings = [(kv_sharding, kv_sharding)] * self.kv_spec.num_layers
        rep = self._replicated
        return jax.jit(
            step,
            in_shardings=(param_shardings(self.state, self.mesh), kv_shardings, rep, rep, rep),
            out_shardings=(kv_shardings, rep, rep),
            donate_argnums=(1,),
        )

    def bucket_shapes(self) -> list[tuple[int, int, int]]:
        """Every (tokens, seqs, pages) combination warm-up compiles: seqs never exceed tokens."""
        return [(t, s, p) for t, s, p in itertools.product(
            self.token_buckets, self.seq_buckets, self.page_buckets) if s <= t]

    def warmup(self) -> float:
        """Compile every bucket; returns the seconds it took."""
        t0 = time.perf_counter()
        for shape in self.bucket_shapes():
            self._compile(*shape)
        self._compiles_at_warmup = compilation_count()
        return time.perf_counter() - t0

    def _compile(self, t: int, s: int, p: int) -> jax.stages.Compiled:
        if (t, s, p) not in self._compiled:
            i32 = jnp.int32
            sd = jax.ShapeDtypeStruct
            md = AttentionMetadata(
                positions=sd((t,), i32), slot_page=sd((t,), i32), slot_offset=sd((t,), i32),
                page_table=sd((s, p), i32), kv_lens=sd((s,), i32), cu_q_lens=sd((s + 1,), i32))
            self._compiled[(t, s, p)] = self._jitted.lower(
                self.state, self.kv_cache, sd((t,), i32), md, sd((s,), i32)).compile()
        return self._compiled[(t, s, p)]

    # ---- one step ----------------------------------------------------------------------------

    def step(self, work: Sequence[SequenceWork]) -> StepOutput:
        if not work:
            raise ValueError("a step needs at least one sequence")
        cfg, page_size = self.config, self.config.page_size
        num_tokens = sum(len(w.token_ids) for w in work)
        t = _pick(self.token_buckets, num_tokens, "tokens per step")
        s = _pick(self.seq_buckets, len(work), "sequences per step")
        p = _pick(self.page_buckets, max(len(w.page_ids) for w in work), "pages per sequence")

        token_ids = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        slot_page = np.full(t, cfg.num_pages, np.int32)      # out of range: dropped on write
        slot_offset = np.zeros(t, np.int32)
        page_table = np.zeros((s, p), np.int32)
        kv_lens = np.zeros(s, np.int32)
        cu_q_lens = np.full(s + 1, num_tokens, np.int32)
        logits_rows = np.zeros(s, np.int32)
        row = 0
        for i, w in enumerate(work):
            n = len(w.token_ids)
            if n == 0:
                raise ValueError(f"sequence {i} has no tokens to compute")
            end = w.num_computed + n
            pages = np.asarray(w.page_ids, np.int32)
            if len(pages) * page_size < end:
                raise ValueError(f"sequence {i}: {len(pages)} pages cannot hold {end} tokens")
            if pages.size and (pages.min() < 0 or pages.max() >= cfg.num_pages):
                raise ValueError(f"sequence {i}: page id out of range [0, {cfg.num_pages})")
            pos = np.arange(w.num_computed, end, dtype=np.int32)
            token_ids[row:row + n] = w.token_ids
            positions[row:row + n] = pos
            slot_page[row:row + n] = pages[pos // page_size]
            slot_offset[row:row + n] = pos % page_size
            page_table[i, :len(pages)] = pages
            kv_lens[i] = end
            cu_q_lens[i] = row
            row += n
            logits_rows[i] = row - 1

        md = AttentionMetadata(positions, slot_page, slot_offset, page_table, kv_lens, cu_q_lens)
        args = jax.device_put((token_ids, md, logits_rows), self._replicated)
        compiled = self._compile(t, s, p)
        self.kv_cache, next_ids, logits = compiled(self.state, self.kv_cache, *args)
        next_ids = np.asarray(next_ids)[:len(work)]
        logits = np.asarray(logits)[:len(work)] if logits is not None else None
        self._check_no_compile()
        return StepOutput(next_ids, logits)

    def _check_no_compile(self) -> None:
        if (self.config.fail_on_compile and self._compiles_at_warmup is not None
                and compilation_count() != self._compiles_at_warmup):
            new = compilation_count() - self._compiles_at_warmup
            self._compiles_at_warmup = compilation_count()
            raise CompiledAfterWarmupError(f"{new} XLA compilation(s) after warm-up")
