"""Sampling on the device, inside the jitted step, in one of three static variants.

Per row (one per sequence of the step): repetition / presence / frequency
penalties over the sequence's tokens (read from the device-side token pages, so
no history crosses from the host), banned ids (EOS and stop ids until
``min_tokens``), temperature, top-k, top-p, min-p, then a draw with the row's
own key ``fold_in(key(seed), index of the token in the output)``: a seeded
request draws the same tokens whatever else shares its batch. Temperature 0 is
argmax. Logprobs are those of the model's raw distribution (vLLM's default),
for the sampled token and the top ``MAX_LOGPROBS``.

Which parts are traced is static: the runner picks a ``variant`` on the host
for each step from what its rows ask for (``variant_for``) and calls that
variant's executable. There is no ``lax.cond`` on device data: XLA's GPU
conditional copies its predicate to the host, so a conditional in the step
blocks every dispatch until the device has caught up and the engine can no
longer prepare step N+1 while step N runs. The variants, each serving every
batch the ones before it serve:

- ``greedy``: argmax of the logits with the banned ids masked.
- ``plain``: ``greedy`` + temperature and the seeded draw (temperature-0 rows keep the argmax).
- ``full``: ``plain`` + penalties, top-k / top-p / min-p, logprobs and the top
  ``MAX_LOGPROBS``, all computed for every row; a row's penalties and filters
  apply only where that row asked for them (``where`` per row), so a row's
  result never depends on the rest of its batch.

Why three: each variant is one more executable per bucket at warm-up (three
variants about double the warm-up of the tiny test model on the CPU), and the
tiers follow the cost of the parts (H100, 64 rows, vocab 128256, sampler alone):
argmax and the banned-id scatter 0.13 ms, + the draw 0.20 ms; the filters' vocab
sort (1.5 ms) and the top-20 (1.3 ms, a sort in XLA) dominate, the penalty
histograms (0.25 ms) ride along with them, and ``full`` costs 1.6 ms. A batch
that needs one of the costly parts pays for all of them. ``greedy`` and
``plain`` return no logprobs (``None``).

In the step (H100, 1B decode, batch 64, context 512, ms/step; before = the
``lax.cond`` sampler, whose host dispatch took the whole step): greedy 3.56 ->
2.25, temperature 3.63 -> 2.28, top-p 4.70 -> 4.60; but a batch that needs only
penalties (3.83) or only logprobs (3.69) now runs ``full``, 4.60.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdyn.engine.sampling_params import MAX_LOGPROBS

NEG_INF = -jnp.inf

GREEDY, PLAIN, FULL = "greedy", "plain", "full"
VARIANTS = (GREEDY, PLAIN, FULL)   # cheapest first; each serves every batch the ones before it serve


def variant_for(*, penalties: bool, filters: bool, random: bool, logprobs: bool) -> str:
    """The cheapest variant for a batch: does any row use penalties, top-k / top-p / min-p (on a
    row with temperature > 0), temperature > 0, or ask for logprobs? (Banned ids: every variant.)"""
    if penalties or filters or logprobs:
        return FULL
    return PLAIN if random else GREEDY


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
    banned: jax.Array             # i32[S, E] ids that may not be drawn now; -1 pads
    # Batch-wide flags of the lax.cond sampler, accepted and ignored: the variant decides now.
    use_penalties: jax.Array | None = None
    use_filters: jax.Array | None = None
    use_random: jax.Array | None = None
    want_logprobs: jax.Array | None = None

    def row_uses_penalties(self) -> jax.Array:   # bool[S], as SamplingParams.uses_penalties
        return ((self.repetition_penalty != 1.0) | (self.presence_penalty != 0.0)
                | (self.frequency_penalty != 0.0))

    def row_uses_filters(self) -> jax.Array:     # bool[S], as SamplingParams.uses_filters
        return (self.top_k > 0) | (self.top_p < 1.0) | (self.min_p > 0.0)


def apply_penalties(logits, history, history_valid, is_output, s: SamplingArrays):
    """logits f32[S,V]; history i32[S,H] token ids; masks bool[S,H]."""
    S, V = logits.shape
    rows = jnp.arange(S)[:, None]
    hist = jnp.clip(history, 0, V - 1)
    out_counts = jnp.zeros((S, V), jnp.float32).at[rows, hist].add(
        (history_valid & is_output).astype(jnp.float32))
    seen = jnp.zeros((S, V), jnp.float32).at[rows, hist].add(history_valid.astype(jnp.float32)) > 0
    rep = s.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - s.frequency_penalty[:, None] * out_counts
    logits = logits - s.presence_penalty[:, None] * (out_counts > 0)
    return logits


def apply_filters(logits, s: SamplingArrays):
    """top-k, then top-p over what top-k kept, then min-p; logits already temperature-scaled."""
    S, V = logits.shape
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, NEG_INF, logits)
    sd = jnp.where(jnp.arange(V)[None, :] < k[:, None], sorted_desc, NEG_INF)
    probs = jax.nn.softmax(sd, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < s.top_p[:, None]
    cutoff = jnp.min(jnp.where(keep, sd, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
    p = jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(p < s.min_p[:, None] * jnp.max(p, axis=-1, keepdims=True), NEG_INF, logits)
    return logits


def sample(logits, history_fn, s: SamplingArrays, variant: str = FULL):
    """Draw one token per row with the parts of the static ``variant`` (see the module docstring).

    ``history_fn()`` returns ``(history i32[S,H], valid bool[S,H], is_output bool[S,H])``;
    only ``full`` (penalties) calls it.
    Returns ``(ids i32[S], logprob f32[S], top_ids i32[S,K], top_logprobs f32[S,K])``; the last
    three are ``None`` unless ``variant`` is ``full``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown sampler variant {variant!r}; expected one of {VARIANTS}")
    S, V = logits.shape
    raw_logits = logits
    if variant == FULL:
        h, valid, is_out = history_fn()
        logits = jnp.where(s.row_uses_penalties()[:, None],
                           apply_penalties(logits, h, valid, is_out, s), logits)
    rows = jnp.arange(S)[:, None]
    banned = jnp.where(s.banned < 0, V, s.banned)
    logits = logits.at[rows, banned].set(NEG_INF, mode="drop")
    ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if variant in (PLAIN, FULL):
        temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
        scaled = logits / temp
        if variant == FULL:
            scaled = jnp.where(s.row_uses_filters()[:, None], apply_filters(scaled, s), scaled)

        def one(seed, idx, row):
            key = jax.random.fold_in(jax.random.key(seed), idx)
            return jax.random.categorical(key, row).astype(jnp.int32)

        drawn = jax.vmap(one)(s.seeds, s.output_index, scaled)
        ids = jnp.where(s.temperature > 0, drawn, ids)
    if variant != FULL:
        return ids, None, None, None
    raw_logprobs = jax.nn.log_softmax(raw_logits, axis=-1)
    logprob = jnp.take_along_axis(raw_logprobs, ids[:, None], axis=-1)[:, 0]
    top_ids, top_lps = _top_logprobs(raw_logprobs)
    return ids, logprob, top_ids, top_lps


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
