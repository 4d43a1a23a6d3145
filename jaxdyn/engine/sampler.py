"""Sampling on the device, inside the jitted step.

Per row (one per sequence of the step): repetition / presence / frequency
penalties over the sequence's tokens (read from the device-side token pages, so
no history crosses from the host), banned ids (EOS and stop ids until
``min_tokens``), temperature, top-k, top-p, min-p, then a draw with the row's
own key ``fold_in(key(seed), index of the token in the output)``: a seeded
request draws the same tokens whatever else shares its batch. Temperature 0 is
argmax. Logprobs are those of the model's raw distribution (vLLM's default),
for the sampled token and the top ``MAX_LOGPROBS``.

The costly parts (penalty histograms, the vocab sort for top-k/top-p, random
draws, top logprobs) sit behind ``lax.cond`` on batch-wide flags, so a batch
that needs none of them pays for none of them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdyn.engine.sampling_params import MAX_LOGPROBS

NEG_INF = -jnp.inf


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
    use_penalties: jax.Array      # bool[] any row has a penalty
    use_filters: jax.Array        # bool[] any row has top-k / top-p / min-p
    use_random: jax.Array         # bool[] any row has temperature > 0
    want_logprobs: jax.Array      # bool[] any row asked for top logprobs


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


def sample(logits, history_fn, s: SamplingArrays):
    """Draw one token per row.

    ``history_fn()`` returns ``(history i32[S,H], valid bool[S,H], is_output bool[S,H])``;
    it is only traced into the penalty branch.
    Returns ``(ids i32[S], logprob f32[S], top_ids i32[S,K], top_logprobs f32[S,K])``.
    """
    S, V = logits.shape
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)

    def penalize(l):
        h, valid, is_out = history_fn()
        return apply_penalties(l, h, valid, is_out, s)

    logits = jax.lax.cond(s.use_penalties, penalize, lambda l: l, logits)
    rows = jnp.arange(S)[:, None]
    banned = jnp.where(s.banned < 0, V, s.banned)
    logits = logits.at[rows, banned].set(NEG_INF, mode="drop")
    greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(l):
        temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
        l = l / temp
        l = jax.lax.cond(s.use_filters, lambda x: apply_filters(x, s), lambda x: x, l)

        def one(seed, idx, row):
            key = jax.random.fold_in(jax.random.key(seed), idx)
            return jax.random.categorical(key, row).astype(jnp.int32)

        drawn = jax.vmap(one)(s.seeds, s.output_index, l)
        return jnp.where(s.temperature > 0, drawn, greedy_ids)

    ids = jax.lax.cond(s.use_random, draw, lambda l: greedy_ids, logits)
    logprob = jnp.take_along_axis(raw_logprobs, ids[:, None], axis=-1)[:, 0]

    def top(lp):
        vals, idx = jax.lax.top_k(lp, MAX_LOGPROBS)
        return idx.astype(jnp.int32), vals

    k = min(MAX_LOGPROBS, V)
    top_ids, top_lps = jax.lax.cond(
        s.want_logprobs,
        lambda lp: tuple(x[:, :MAX_LOGPROBS] for x in _pad_top(top, lp, k)),
        lambda lp: (jnp.zeros((S, MAX_LOGPROBS), jnp.int32), jnp.zeros((S, MAX_LOGPROBS), jnp.float32)),
        raw_logprobs)
    return ids, logprob, top_ids, top_lps


def _pad_top(top, lp, k):
    S, V = lp.shape
    if V >= MAX_LOGPROBS:
        return top(lp)
    vals, idx = jax.lax.top_k(lp, k)
    pad = MAX_LOGPROBS - k
    return (jnp.pad(idx.astype(jnp.int32), ((0, 0), (0, pad))),
            jnp.pad(vals, ((0, 0), (0, pad)), constant_values=NEG_INF))
