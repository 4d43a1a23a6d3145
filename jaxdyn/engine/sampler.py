"""Sampling on the device, inside the jitted step, in one of four static variants.

Per row (one per sequence of the step): repetition / presence / frequency
penalties over the sequence's tokens (read from the device-side token pages, so
no history crosses from the host) after the row's logit bias and its banned ids (EOS and stop ids until
``min_tokens``: a bias of -inf), both added first as vLLM V1 does, temperature, min-p, top-k, top-p, then a draw with the row's
own key ``fold_in(key(seed), index of the token in the output)``: a seeded
request draws the same tokens whatever else shares its batch. Temperature 0 is
argmax. Logprobs are those of the model's raw distribution (vLLM's default),
for the sampled token and the top ``MAX_LOGPROBS``, with the sampled token's rank
there (vLLM V1's: the ids whose raw logprob is at least its own) in the top ids'
extra column ``RANK_COL``.

Which parts are traced is static: the runner picks a ``variant`` on the host
for each step from what its rows ask for (``variant_for``) and calls that
variant's executable. A variant's sampler holds no ``lax.cond`` on device data: XLA's GPU
conditional outside a command buffer copies its predicate to the host, so such a conditional
blocks every dispatch until the device has caught up and the engine can no longer prepare
step N+1 while step N runs (``RunnerConfig.sampler_switch``, a GPU's default for ``plain`` and
``full``, is a ``lax.switch`` over the samplers that XLA keeps inside the step's command
buffer, see below). The variants, each serving every batch the ones before it serve:

- ``greedy``: argmax of the logits with the logit bias added and the banned ids masked.
- ``random``: ``greedy`` + temperature and the seeded draw (temperature-0 rows keep the argmax): the OpenAI API's
  default request (temperature 1, nothing else), which should not pay for the parts below.
- ``plain``: ``random`` + penalties and min-p / top-k / top-p (temperature-0 rows keep the argmax, after their
  penalties). The penalties are three scatters over the rows' history
  (``apply_penalties``), a no-op on a row without them. On a GPU the filters find their thresholds without a sort
  (``apply_filters_sort_free``: a Pallas call a pass of a radix search, whose programs for a row that asks for no
  filter read nothing); elsewhere a vocabulary sort.
- ``full``: ``plain`` + allowed ids, logprobs and the top ``MAX_LOGPROBS`` (``lax.top_k``), all computed for every
  row; a row's filters apply only where that row asked for them (``where`` per row), so a row's result never
  depends on the rest of its batch.

Why four: each variant is one more executable per bucket at warm-up (three variants about double the warm-up of
the tiny test model on the CPU; the 8B fp8 engine's cold start on an H100 went from 30 to 40 executables with
it; 30 again on a GPU, where by default ``plain`` and ``full`` share one switched executable a bucket,
``RunnerConfig.sampler_switch``). ``random`` is session 32's: with temperature-only rows in ``plain`` (its
penalties' scatters and the filters' passes launched for rows that use neither), a run of temperature-1 requests
ran 0.973x one on ``plain`` without them, and the sampler alone at 1,024 rows took 2.05 ms against ``random``'s
1.39 (H100, 8B, ``benchmarks/results/gpu_suite_h200.md``). Until session 31 ``full`` held the penalties and the filters too, with
a vocabulary sort, and a request with top-p or a repetition penalty made every step it was in pay for the top
logprobs' sort and the rank as well (H100, 8B vocabulary, all parts on every row: 2.5 / 6.2 / 23.3 ms at 64 / 256 /
1,024 rows, against 0.17 / 0.40 / 1.25 for ``plain`` then). Only ``full`` returns logprobs (the others ``None``).

``sort_free=True`` (``RunnerConfig.sampler_switch``, where the four variants, or ``plain`` and ``full`` (its
"plain_full", a GPU's default), are the branches of one ``lax.switch`` in one executable a bucket): the filters' top-k
and top-p find the k-th largest logit and top-p's cutoff by a radix search over order-preserving u32 keys of the
logits (``pallas_kernels.sampling_thresholds``: its passes on a GPU, ``jax.numpy`` elsewhere) and its top logprobs by
``MAX_LOGPROBS`` masked argmaxes: top-k and the top logprobs exactly the sort's (ties included), top-p the sort's up
to float rounding at its boundary (``apply_filters_sort_free``); with tensor parallelism the logits are gathered
before the switch, so no branch holds a collective. XLA sends a vocabulary sort (and a top-k) to CUB on a GPU from 32
rows, a call its command buffers cannot hold; a conditional whose branches hold one is run by the host, which copies
the index back and waits: the sync the variants exist to avoid. A conditional whose branches hold only kernels is
recorded into the step's CUDA graph as conditional nodes (CONDITIONAL is among XLA's default command-buffer kinds in
jaxlib 0.10 and 0.11, CUDA 12.3 and later; whether the step's conditional is recorded on a GPU is what
``benchmarks/gpu/thunk_census.py`` reads).

In the step (H100, 1B decode, batch 64, context 512, ms/step; before = the
``lax.cond`` sampler, whose host dispatch took the whole step): greedy 3.56 ->
2.25, temperature 3.63 -> 2.28, top-p 4.70 -> 4.60; but a batch that needs only
penalties (3.83) or only logprobs (3.69) then ran ``full``, 4.60 (penalties and filters: ``plain`` since
session 31).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdyn.engine.sampling_params import MAX_LOGPROBS
from pallas_kernels.paged_decode import on_gpu
from pallas_kernels.sampling_thresholds import order_keys, sampling_thresholds, scale_and_floor

RANK_COL = MAX_LOGPROBS     # full's top ids i32[S, MAX_LOGPROBS + 1]: this column is the drawn token's rank
NEG_INF = -jnp.inf
# An entry of a row's ``biased`` block after which its ids are the only ones the row may draw
# (``allowed_token_ids``; before it: bans and logit_bias); the ``full`` variant alone applies it (the host picks
# ``full`` for such a row)
ALLOWED_MARK = -2

GREEDY, RANDOM, PLAIN, FULL = "greedy", "random", "plain", "full"
VARIANTS = (GREEDY, RANDOM, PLAIN, FULL)   # cheapest first; each serves every batch the ones before it serve


def variant_for(*, penalties: bool, filters: bool, random: bool, logprobs: bool, allowed: bool = False) -> str:
    """The cheapest variant for a batch: does any row use penalties, top-k / top-p / min-p (on a
    row with temperature > 0), temperature > 0, ask for logprobs, or draw from an allowed set only? (Banned and
    biased ids: every variant.)"""
    if logprobs or allowed:
        return FULL
    if filters or penalties:
        return PLAIN
    return RANDOM if random else GREEDY


def serves(variant: str, needed: str) -> bool:
    """Whether ``variant``'s executable computes everything a batch that needs ``needed`` asks for."""
    return VARIANTS.index(variant) >= VARIANTS.index(needed)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    temperature: jax.Array        # f32[S] 0: greedy
    top_k: jax.Array              # i32[S] 0: off
    top_p: jax.Array              # f32[S]
    min_p: jax.Array              # f32[S]
    repetition_penalty: jax.Array  # f32[S]
    presence_penalty: jax.Array   # f32[S]
    frequency_penalty: jax.Array  # f32[S]
    prompt_lens: jax.Array        # i32[S] tokens before this position are the prompt
    seeds: jax.Array              # u32[S]
    output_index: jax.Array       # i32[S] index of the token being drawn in the output
    biased: jax.Array             # i32[S, E] ids whose logits move by ``bias`` (logit_bias, and bans); -1 pads
    # Batch-wide flags of the lax.cond sampler, accepted and ignored: the variant decides now.
    use_penalties: jax.Array | None = None
    use_filters: jax.Array | None = None
    use_random: jax.Array | None = None
    want_logprobs: jax.Array | None = None
    seeds_hi: jax.Array | None = None   # u32[S] a 64-bit seed's high half (None: 0)
    bias: jax.Array | None = None  # f32[S, E] added to the ``biased`` ids' logits before penalties; -inf: may not
                                   # be drawn now; None: every biased id banned

    def row_uses_penalties(self) -> jax.Array:   # bool[S], as SamplingParams.uses_penalties
        return ((self.repetition_penalty != 1.0) | (self.presence_penalty != 0.0)
                | (self.frequency_penalty != 0.0))

    def row_uses_filters(self) -> jax.Array:     # bool[S], as SamplingParams.uses_filters
        return (self.top_k > 0) | (self.top_p < 1.0) | (self.min_p > 0.0)


def apply_penalties(logits, history, history_valid, is_output, s: SamplingArrays):
    """logits f32[S,V]; history i32[S,H] token ids; masks bool[S,H]. Three scatters over the history's entries,
    no [S, V] count: each seen token's logit set to its repetition-penalised value (a token's entries all write the
    same value), each output token's to that minus the presence penalty, then the frequency penalty added once an
    output entry. A row without penalties (1, 0, 0) comes out bit for bit as it went in (x / 1, x * 1, x - 0,
    x + -0.0 are x), so no per-row select is needed."""
    S, V = logits.shape
    rows = jnp.arange(S)[:, None]
    hist = jnp.clip(history, 0, V - 1)
    seen = jnp.where(history_valid, hist, V)                    # V: out of range, dropped
    out = jnp.where(history_valid & is_output, hist, V)
    g = jnp.take_along_axis(logits, hist, axis=1)
    rep = s.repetition_penalty[:, None]
    r = jnp.where(g > 0, g / rep, g * rep)
    logits = logits.at[rows, seen].set(r, mode="drop")
    logits = logits.at[rows, out].set(r - s.presence_penalty[:, None], mode="drop")
    return logits.at[rows, out].add(jnp.broadcast_to(-s.frequency_penalty[:, None], out.shape), mode="drop")


# top-p below this counts as this (the top token alone, as any top-p near 0): a subnormal top-p, which the GPU
# flushes to zero, would otherwise keep no token (the sort) or every token (the sort-free search)
TOP_P_FLOOR = 1e-30


def apply_filters(logits, s: SamplingArrays):
    """min-p, then top-k, then top-p over what those kept (vLLM V1's order: its min-p is a logits processor that
    runs before its top-k/top-p sampler); logits already temperature-scaled."""
    S, V = logits.shape
    logits = _min_p(logits, s)
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, NEG_INF, logits)
    sd = jnp.where(jnp.arange(V)[None, :] < k[:, None], sorted_desc, NEG_INF)
    probs = jax.nn.softmax(sd, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    # top_p 1 keeps every token: the tail's mass before it can round to 1 in float32, which would drop it
    keep = (before < jnp.maximum(s.top_p, TOP_P_FLOOR)[:, None]) | (s.top_p >= 1.0)[:, None]
    cutoff = jnp.min(jnp.where(keep, sd, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, NEG_INF, logits)


def _min_p_floor(m, s: SamplingArrays):
    """f32[S, 1]: the logit under which min-p drops a token, ``max + log(min_p)`` (-inf for min_p 0): a probability
    under min_p times the largest's (a ratio: the same over any subset that holds the largest), no normalisation.
    ``m``: the rows' maxima, f32[S, 1]."""
    return jnp.where(s.min_p[:, None] > 0, m + jnp.log(s.min_p[:, None]), NEG_INF)   # (an inf max: no NaN floor)


def _min_p(logits, s: SamplingArrays):
    # kept where at or above the floor, as the thresholds' kernels keep them (a NaN is dropped by both)
    return jnp.where(logits >= _min_p_floor(jnp.max(logits, axis=-1, keepdims=True), s), logits, NEG_INF)


def apply_filters_sort_free(logits, s: SamplingArrays, inv_temperature=None):
    """``apply_filters`` without a sort (``sample(sort_free=True)``): the k-th largest logit and top-p's cutoff from
    ``pallas_kernels.sampling_thresholds`` (a radix search over the logits' order keys: on a GPU its passes, a
    Pallas call each, else ``jax.numpy``) instead of a vocabulary sort, which XLA sends to CUB on a GPU from 32
    rows, a call its command buffers cannot hold. Top-k keeps exactly the sort's tokens: every logit at least the
    k-th largest (ties kept). Top-p is over the k largest alone (ties at the k-th counted as in the sorted order,
    to fill k) and keeps the sort's tokens up to float rounding at its boundary: the sort compares a running sum of
    normalised probabilities with top_p, this a sum of unnormalised mass with top_p times their total, so a token
    whose mass before it is within rounding of top_p may be kept by one and not the other (at a vocabulary of
    32,000, a token in a few rows of 64). Min-p first, as there.

    ``inv_temperature`` (f32[S, 1]): ``logits`` are unscaled; the filters are those of ``logits * inv_temperature``,
    which is what they return, and the thresholds' passes scale as they read (and apply min-p's floor), so that no
    scaled copy of the rows is written for them: a step whose rows ask for no filter pays little more than the
    draw."""
    S, V = logits.shape
    # the scaled rows' max: a positive factor keeps the order, so it is the max scaled (and min-p never drops it)
    m = jnp.max(logits, axis=-1, keepdims=True)
    if inv_temperature is not None:
        m = m * inv_temperature
    floor = _min_p_floor(m, s)
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
    scale = None if inv_temperature is None else inv_temperature[:, 0]
    kth, cutoff = sampling_thresholds(logits, k, jnp.maximum(s.top_p, TOP_P_FLOOR), row_max=m[:, 0], scale=scale,
                                      floor=floor[:, 0])
    x = scale_and_floor(logits, scale, floor[:, 0])      # the array the passes' programs read
    keys = order_keys(x)
    return jnp.where((keys < kth[:, None]) | (keys < cutoff[:, None]), NEG_INF, x)


def top_logprobs_sort_free(lp):
    """``_top_logprobs`` without ``lax.top_k`` (a sort on a GPU): the ``MAX_LOGPROBS`` largest by repeated
    argmax, each over what is below the last in (value descending, index ascending) order -- ``lax.top_k``'s."""
    S, V = lp.shape
    keys = order_keys(lp)
    col = jnp.arange(V, dtype=jnp.int32)[None, :]
    ids, vals, prev_key, prev_id = [], [], None, None
    for _ in range(min(MAX_LOGPROBS, V)):
        if prev_key is None:
            cand = keys
        else:
            below = (keys < prev_key[:, None]) | ((keys == prev_key[:, None]) & (col > prev_id[:, None]))
            cand = jnp.where(below, keys, jnp.uint32(0))      # key 0 is below every float's but a NaN's
        i = jnp.argmax(cand, axis=-1).astype(jnp.int32)
        prev_key, prev_id = jnp.take_along_axis(keys, i[:, None], axis=-1)[:, 0], i
        ids.append(i)
        vals.append(jnp.take_along_axis(lp, i[:, None], axis=-1)[:, 0])
    idx, v = jnp.stack(ids, axis=-1), jnp.stack(vals, axis=-1)
    pad = MAX_LOGPROBS - idx.shape[-1]
    if pad == 0:
        return idx, v
    return jnp.pad(idx, ((0, 0), (0, pad))), jnp.pad(v, ((0, 0), (0, pad)), constant_values=NEG_INF)


def sample(logits, history_fn, s: SamplingArrays, variant: str = FULL, sort_free: bool | None = None):
    """Draw one token per row with the parts of the static ``variant`` (see the module docstring).

    ``history_fn()`` returns ``(history i32[S,H], valid bool[S,H], is_output bool[S,H])``;
    ``plain`` and ``full`` (penalties) call it.
    Returns ``(ids i32[S], logprob f32[S], top_ids i32[S,K+1], top_logprobs f32[S,K])`` (``top_ids[:, RANK_COL]``:
    the drawn token's rank among the raw logprobs); the last
    three are ``None`` unless ``variant`` is ``full``. ``sort_free``: True, the filters and the top logprobs
    without a sort (``apply_filters_sort_free``, ``top_logprobs_sort_free``; top-k and the top logprobs the same,
    top-p up to rounding at its boundary); None (the variants' executables), the filters sort-free on a GPU and
    sorted elsewhere, the top logprobs by ``lax.top_k``; False, both sorted.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown sampler variant {variant!r}; expected one of {VARIANTS}")
    S, V = logits.shape
    raw_logits = logits
    # logit_bias and bans first, then penalties (vLLM V1's order); a ban is a bias of -inf
    rows = jnp.arange(S)[:, None]
    biased = jnp.where(s.biased < 0, V, s.biased)
    bias = jnp.full(biased.shape, NEG_INF, logits.dtype) if s.bias is None else s.bias.astype(logits.dtype)
    logits = logits.at[rows, biased].add(bias, mode="drop")
    if variant == FULL:
        # allowed_token_ids (a row whose block holds ALLOWED_MARK): its listed ids keep their (biased) logits, every
        # other id -inf, before the penalties (vLLM V1 masks first; a bias or ban of a listed id still applies)
        mark = s.biased == ALLOWED_MARK
        only = jnp.any(mark, axis=1)
        after = jnp.cumsum(mark, axis=1) > 0            # the marker and the entries after it: the allowed ids
        kept = jnp.take_along_axis(logits, jnp.minimum(biased, V - 1), axis=1)
        restore = jnp.where(only[:, None] & ~after, V, biased)   # an only-row's bans and biases stay masked
        logits = jnp.where(only[:, None], NEG_INF, logits).at[rows, restore].set(kept, mode="drop")
    if variant in (PLAIN, FULL):
        logits = apply_penalties(logits, *history_fn(), s)     # a row without penalties unchanged
    ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if variant != GREEDY:
        # a product by the reciprocal (not a quotient): the thresholds' kernels scale the same way (a GPU kernel's
        # division need not round as XLA's does, a product does), so their keys are the draw's
        inv_temp = 1.0 / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
        scaled = logits * inv_temp
        if variant != RANDOM:
            sorted_filters = (not on_gpu()) if sort_free is None else not sort_free
            filtered = apply_filters(scaled, s) if sorted_filters else apply_filters_sort_free(logits, s, inv_temp)
            scaled = jnp.where(s.row_uses_filters()[:, None], filtered, scaled)

        def one(seed, hi, idx, row):
            key = jax.random.key(seed)
            # a seed's high half folded in where it is not 0 (32-bit seeds draw as they did)
            key = jax.random.wrap_key_data(jnp.where(hi != 0, jax.random.key_data(jax.random.fold_in(key, hi)),
                                                     jax.random.key_data(key)))
            key = jax.random.fold_in(key, idx)
            return jax.random.categorical(key, row).astype(jnp.int32)

        hi = s.seeds_hi if s.seeds_hi is not None else jnp.zeros_like(s.seeds)
        drawn = jax.vmap(one)(s.seeds, hi, s.output_index, scaled)
        ids = jnp.where(s.temperature > 0, drawn, ids)
    if variant != FULL:
        return ids, None, None, None
    raw_logprobs = jax.nn.log_softmax(raw_logits, axis=-1)
    logprob = jnp.take_along_axis(raw_logprobs, ids[:, None], axis=-1)[:, 0]
    top_ids, top_lps = (top_logprobs_sort_free if sort_free else _top_logprobs)(raw_logprobs)
    rank = jnp.sum(raw_logprobs >= logprob[:, None], axis=-1, dtype=jnp.int32)
    return ids, logprob, jnp.concatenate([top_ids, rank[:, None]], axis=1), top_lps


def _top_logprobs(lp):
    """(i32[S, MAX_LOGPROBS], f32[S, MAX_LOGPROBS]); a vocab smaller than that pads with -inf."""
    k = min(MAX_LOGPROBS, lp.shape[-1])
    vals, idx = jax.lax.top_k(lp, k)
    idx = idx.astype(jnp.int32)
    pad = MAX_LOGPROBS - k
    if pad == 0:
        return idx, vals
    return (jnp.pad(idx, ((0, 0), (0, pad))),
            jnp.pad(vals, ((0, 0), (0, pad)), constant_values=NEG_INF))
