"""The on-device sampler against numpy: filters, penalties, seeds, banned ids, logprobs; its static
variants draw what ``full`` draws, and none holds a conditional."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.engine.sampler import (
    FULL, GREEDY, PLAIN, RANDOM, RANK_COL, VARIANTS, SamplingArrays, _top_logprobs, apply_filters, apply_filters_sort_free,
    apply_penalties, sample, serves, top_logprobs_sort_free, variant_for)
from pallas_kernels.sampling_thresholds import order_keys
from jaxdyn.engine.sampling_params import MAX_LOGPROBS
from tests.support import lowered_count


def arrays(S, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rep=1.0, pres=0.0, freq=0.0,
           seeds=None, index=None, banned=None, prompt_lens=0):
    f = lambda v, dt=np.float32: np.broadcast_to(np.asarray(v, dt), (S,)).copy()
    b = lambda v: np.bool_(v)
    return SamplingArrays(
        f(temperature), f(top_k, np.int32), f(top_p), f(min_p), f(rep), f(pres), f(freq),
        f(prompt_lens, np.int32), f(0 if seeds is None else seeds, np.uint32),
        f(0 if index is None else index, np.int32),
        np.full((S, 4), -1, np.int32) if banned is None else banned,
        b(rep != 1.0 or pres != 0.0 or freq != 0.0), b(top_k > 0 or top_p < 1 or min_p > 0),
        b(np.any(np.asarray(temperature) > 0)), b(True))


def np_filters(logits, top_k, top_p, min_p):
    """vLLM V1's order (``vllm/v1/sample/sampler.py``): min-p over the whole distribution, then top-k, then top-p
    over what those kept (renormalised)."""
    out = logits.copy()
    p = np.exp(out - out.max())
    p /= p.sum()
    out[p < min_p * p.max()] = -np.inf
    order = np.argsort(-out, kind="stable")
    if top_k:
        out[order[top_k:]] = -np.inf
    p = np.exp(out - out.max())
    p /= p.sum()
    cum_before = np.cumsum(p[order]) - p[order]
    drop = order[cum_before >= top_p]
    out[drop] = -np.inf
    return out


@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.6, 0.0),
                                                 (8, 0.8, 0.0), (0, 1.0, 0.2), (3, 0.9, 0.1), (0, 0.7, 0.1),
                                                 (0, 0.9, 0.04)])
def test_filters_match_numpy(top_k, top_p, min_p):
    rng = np.random.default_rng(top_k)
    logits = rng.normal(size=(4, 32)).astype(np.float32) * 2
    s = arrays(4, top_k=top_k, top_p=top_p, min_p=min_p)
    for filters in (apply_filters, apply_filters_sort_free):
        got = np.asarray(filters(jnp.asarray(logits), s))
        for r in range(4):
            want = np_filters(logits[r], top_k, top_p, min_p)
            assert np.array_equal(np.isinf(got[r]), np.isinf(want)), (filters.__name__, r)
            assert np.allclose(got[r][~np.isinf(want)], want[~np.isinf(want)])


def test_min_p_filters_before_top_p_as_vllm_v1():
    """min-p first, then top-p over what it kept: top-p's mass is then counted over fewer tokens, so it keeps
    fewer. In the other order (vLLM V0's, jaxdyn's before) this row keeps its third token too."""
    logits = np.log(np.array([[0.5, 0.3, 0.1, 0.06, 0.02, 0.02]], np.float32))
    s = arrays(1, top_p=0.85, min_p=0.15)
    for filters in (apply_filters, apply_filters_sort_free):
        kept = ~np.isinf(np.asarray(filters(jnp.asarray(logits), s))[0])
        # min-p (0.15 x 0.5 = 0.075) keeps 0.5, 0.3, 0.1 -> renormalised 0.556, 0.333, 0.111: top-p 0.85 keeps two
        assert kept.tolist() == [True, True, False, False, False, False], filters.__name__


def test_penalties_match_the_formulas():
    logits = np.array([[2.0, -1.0, 0.5, 3.0, -2.0]], np.float32)
    history = np.array([[0, 1, 3, 3, 2]])        # prompt: 0 1 ; output: 3 3 2
    valid = np.ones_like(history, bool)
    is_out = np.array([[False, False, True, True, True]])
    s = arrays(1, rep=2.0, pres=0.5, freq=0.25)
    got = np.asarray(apply_penalties(jnp.asarray(logits), history, valid, is_out, s))[0]
    want = np.array([2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.25 - 0.5, 3.0 / 2 - 0.5 - 0.5, -2.0])
    assert np.allclose(got, want)


def test_penalties_leave_a_row_without_them_bit_for_bit_and_count_repeats():
    """No per-row select: a row with repetition 1, presence 0, frequency 0 passes through the scatters unchanged,
    -inf, 0.0 and -0.0 included; a repeated output token pays the frequency penalty once an occurrence and the
    presence penalty once; padding entries (not valid) change nothing."""
    logits = np.array([[2.0, -np.inf, 0.0, -0.0, 3.0, -1.5],
                       [2.0, -np.inf, 0.0, -0.0, 3.0, -1.5]], np.float32)
    history = np.array([[0, 1, 2, 3, 4, 4, 5], [0, 4, 4, 4, 5, 5, 2]])
    valid = np.array([[True] * 7, [True] * 6 + [False]])
    is_out = np.array([[False, False, True, True, True, True, True], [False, True, True, True, True, True, True]])
    s = dataclasses.replace(arrays(2), repetition_penalty=jnp.asarray([1.0, 1.0], jnp.float32),
                            presence_penalty=jnp.asarray([0.0, 0.5], jnp.float32),
                            frequency_penalty=jnp.asarray([0.0, 0.25], jnp.float32))
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), history, valid, is_out, s))
    assert got[0].tobytes() == logits[0].tobytes()
    np.testing.assert_allclose(got[1], [2.0, -np.inf, 0.0, 0.0, 3.0 - 0.5 - 3 * 0.25, -1.5 - 0.5 - 2 * 0.25])


def _draw(logits, s):
    S = logits.shape[0]
    h = lambda: (jnp.zeros((S, 1), jnp.int32), jnp.zeros((S, 1), bool), jnp.zeros((S, 1), bool))
    return jax.jit(lambda l, s: sample(l, h, s))(jnp.asarray(logits), s)


def test_draws_follow_the_filtered_distribution():
    logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32))
    N = 6000
    s = arrays(N, temperature=1.0, top_k=3, seeds=np.arange(N), index=np.zeros(N))
    ids = np.asarray(_draw(np.tile(logits, (N, 1)), s)[0])
    freq = np.bincount(ids, minlength=5) / N
    want = np.array([0.4, 0.3, 0.15, 0, 0]) / 0.85
    assert np.abs(freq - want).max() < 0.03
    # Temperature sharpens: at 0.5 the top token gets p^2 normalised.
    s = arrays(N, temperature=0.5, seeds=np.arange(N) + 10**6)
    ids = np.asarray(_draw(np.tile(logits, (N, 1)), s)[0])
    p2 = np.exp(logits * 2) / np.exp(logits * 2).sum()
    assert abs((ids == 0).mean() - p2[0]) < 0.03


def test_a_seed_draws_the_same_token_in_any_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 50)).astype(np.float32)
    seeds = rng.integers(0, 2**32, 8, dtype=np.uint64).astype(np.uint32)
    full = np.asarray(_draw(logits, arrays(8, seeds=seeds, index=np.arange(8)))[0])
    for r in [0, 5, 7]:
        alone = np.asarray(_draw(logits[r:r + 1], arrays(1, seeds=seeds[r:r + 1], index=[r]))[0])
        assert alone[0] == full[r]


def test_greedy_banned_and_logprobs():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 40)).astype(np.float32)
    top = logits.argmax(-1)
    banned = np.full((3, 4), -1, np.int32)
    banned[1, 0] = top[1]
    ids, lp, top_ids, top_lps = _draw(logits, arrays(3, temperature=0.0, banned=banned))
    ids = np.asarray(ids)
    assert ids[0] == top[0] and ids[2] == top[2] and ids[1] != top[1]
    assert ids[1] == np.argsort(-logits[1])[1]
    ref = jax.nn.log_softmax(logits, -1)
    assert np.allclose(np.asarray(lp), np.asarray(ref)[np.arange(3), ids], atol=1e-6)
    assert np.array_equal(np.asarray(top_ids)[:, 0], top)
    # Sampled rows never draw a banned id.
    N = 2000
    b = np.full((N, 4), -1, np.int32)
    b[:, 0] = 0
    flat = np.zeros((N, 4), np.float32)
    ids = np.asarray(_draw(flat, arrays(N, temperature=1.0, seeds=np.arange(N), banned=b))[0])
    assert 0 not in ids and set(ids) == {1, 2, 3}


# ---- static variants -------------------------------------------------------------------------

@pytest.mark.parametrize("needs, want", [
    (dict(), GREEDY),
    (dict(random=True), RANDOM),
    (dict(penalties=True), PLAIN),
    (dict(random=True, filters=True), PLAIN),
    (dict(random=True, filters=True, penalties=True), PLAIN),
    (dict(random=True, filters=True, penalties=True, allowed=True), FULL),
    (dict(logprobs=True), FULL),
    (dict(random=True, penalties=True, filters=True, logprobs=True), FULL),
])
def test_the_cheapest_variant_that_serves_the_batch_is_picked(needs, want):
    flags = dict(penalties=False, filters=False, random=False, logprobs=False) | needs
    assert variant_for(**flags) == want
    assert [v for v in VARIANTS if serves(v, want)] == list(VARIANTS[VARIANTS.index(want):])


def mixed_batch(seed=0):
    """Twelve rows of every kind: greedy, greedy with a banned argmax, seeded draws (one banning
    its argmax), top-k / top-p / min-p, penalties (greedy and sampled), and what each row needs."""
    rng = np.random.default_rng(seed)
    S, V, H = 12, 64, 10
    logits = (rng.normal(size=(S, V)) * 2).astype(np.float32)
    col = lambda *v: np.array(v)
    temperature = col(0, 0, 0, 0, 0.7, 1.0, 1.3, 1.0, 1.0, 0.8, 1.2, 0.9)
    top_k = col(0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0)
    top_p = col(1, 1, 1, 1, 1, 1, 1, 1, 1, 0.8, 1, 1)
    min_p = col(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.1, 0)
    rep = col(1, 1, 1.5, 1, 1, 1, 1, 1, 1, 1, 1, 1.3)
    pres = col(0, 0, 0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0.4)
    freq = col(0, 0, 0.7, 0, 0, 0, 0, 0, 0, 0, 0, 0.2)
    banned = np.full((S, 4), -1, np.int32)
    banned[1, 0] = logits[1].argmax()
    banned[7, :2] = np.argsort(-logits[7])[:2]
    f32 = lambda v: v.astype(np.float32)
    s = SamplingArrays(f32(temperature), top_k.astype(np.int32), f32(top_p), f32(min_p), f32(rep), f32(pres),
                       f32(freq), np.full(S, 4, np.int32), rng.integers(0, 2**32, S, dtype=np.uint64).astype(np.uint32),
                       rng.integers(0, 50, S).astype(np.int32), banned)
    history = (rng.integers(0, V, (S, H)).astype(np.int32), np.arange(H)[None, :] < rng.integers(4, H + 1, (S, 1)),
               np.broadcast_to(np.arange(H)[None, :] >= 4, (S, H)))
    needs = [variant_for(penalties=bool(rep[r] != 1 or pres[r] or freq[r]),
                         filters=bool(temperature[r] > 0 and (top_k[r] or top_p[r] < 1 or min_p[r])),
                         random=bool(temperature[r] > 0), logprobs=False) for r in range(S)]
    return logits, s, history, needs


_SAMPLE = {v: jax.jit(lambda l, s, h, v=v: sample(l, lambda: h, s, v)) for v in VARIANTS}


def _sample(logits, s, history, variant):
    if variant not in _SAMPLE:
        return sample(jnp.asarray(logits), lambda: history, s, variant)
    return _SAMPLE[variant](jnp.asarray(logits), s, tuple(jnp.asarray(x) for x in history))


def _rows(s, history, rows):
    return jax.tree.map(lambda x: x[rows], s), tuple(x[rows] for x in history)


@pytest.mark.parametrize("variant", [GREEDY, RANDOM, PLAIN])
def test_greedy_random_and_plain_draw_what_full_draws_on_the_rows_they_serve(variant):
    logits, s, history, needs = mixed_batch()
    rows = np.array([r for r, need in enumerate(needs) if serves(variant, need)])
    assert {needs[r] for r in rows} == set(VARIANTS[:VARIANTS.index(variant) + 1]), "every kind it serves"
    sub, hist = _rows(s, history, rows)
    ids, lp, top_ids, top_lps = _sample(logits[rows], sub, hist, variant)
    assert lp is None and top_ids is None and top_lps is None       # logprobs only in full
    full_ids = _sample(logits[rows], sub, hist, FULL)[0]
    assert np.array_equal(np.asarray(ids), np.asarray(full_ids))
    greedy = np.asarray(sub.temperature) == 0
    want = np.array([np.argmax(np.where(np.isin(np.arange(64), b[b >= 0]), -np.inf, l))
                     for l, b in zip(logits[rows], sub.biased)])
    assert np.array_equal(np.asarray(ids)[greedy], want[greedy])   # temperature 0: the argmax


def test_random_traces_the_draw_and_neither_the_penalties_nor_the_filters():
    """``random`` is ``greedy``'s program plus the draw: the bias's scatters and no sort (the CPU's filters) and no
    penalty scatters, which ``plain`` holds; ``greedy`` draws nothing."""
    logits, s, history, _ = mixed_batch()
    args = (jnp.asarray(logits), s, tuple(jnp.asarray(x) for x in history))
    texts = {v: jax.jit(lambda lg, sa, h, v=v: sample(lg, lambda: h, sa, v)).lower(*args).as_text()
             for v in (GREEDY, RANDOM, PLAIN)}
    count = lambda v, op: texts[v].count(op)        # noqa: E731
    assert count(RANDOM, "stablehlo.scatter") == count(GREEDY, "stablehlo.scatter") < count(PLAIN, "stablehlo.scatter")
    assert count(RANDOM, "stablehlo.sort") == 0 < count(PLAIN, "stablehlo.sort")
    assert count(GREEDY, "threefry") == 0 < count(RANDOM, "threefry")


def test_a_row_of_a_full_batch_draws_what_its_own_variant_draws_alone():
    """Penalties and filters apply per row in ``full``: a row without them gets what ``greedy`` or
    ``plain`` gives it alone, and a row with them what it gets alone; logprobs are the raw model's."""
    logits, s, history, needs = mixed_batch(1)
    ids, lp, top_ids, top_lps = (np.asarray(x) for x in _sample(logits, s, history, FULL))
    assert set(needs) == {GREEDY, RANDOM, PLAIN}        # temperature alone: random; penalties and filters: plain
    for r, need in enumerate(needs):
        sub, hist = _rows(s, history, np.array([r]))
        assert int(_sample(logits[r:r + 1], sub, hist, need)[0][0]) == ids[r], r
        alone = _sample(logits[r:r + 1], sub, hist, FULL)
        assert np.array_equal(np.asarray(alone[1])[0], lp[r]) and np.array_equal(np.asarray(alone[3])[0], top_lps[r])
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    assert np.allclose(lp, ref[np.arange(12), ids], atol=1e-6)
    assert np.array_equal(top_ids[:, :MAX_LOGPROBS], np.argsort(-ref, axis=-1, kind="stable")[:, :MAX_LOGPROBS])
    assert np.allclose(top_lps, np.sort(ref, axis=-1)[:, ::-1][:, :MAX_LOGPROBS], atol=1e-6)
    # the drawn token's rank among the raw logprobs (vLLM V1's: the ids at least as likely), in or out of the top
    assert np.array_equal(top_ids[:, RANK_COL], (ref >= ref[np.arange(12), ids][:, None]).sum(-1))
    assert top_ids.shape == (12, MAX_LOGPROBS + 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_variant_holds_a_conditional_or_a_loop(variant):
    """XLA's GPU conditional (and loop) reads its predicate on the host, a sync every step: none in
    any variant lowered for the GPU, no conditional lowered for the CPU (where jax rolls threefry's
    rounds into a loop)."""
    logits, s, history, _ = mixed_batch()
    traced = _SAMPLE[variant].trace(jnp.asarray(logits), s, tuple(jnp.asarray(x) for x in history))
    for platform in ("cuda", "cpu"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert "stablehlo.case" not in text and "stablehlo.if" not in text, platform
        assert platform == "cpu" or "stablehlo.while" not in text
    assert "cond[" not in str(traced.jaxpr)


def test_an_unknown_variant_is_refused():
    logits, s, history, _ = mixed_batch()
    with pytest.raises(ValueError, match="unknown sampler variant 'fast'"):
        _sample(logits, s, history, "fast")


def test_order_keys_order_floats_as_floats_do():
    x = np.array([-np.inf, -3e38, -2.0, -1e-30, -0.0, 0.0, 1e-37, 1e-30, 2.0, 3e38, np.inf], np.float32)  # normals: XLA flushes subnormals
    keys = np.asarray(jax.jit(order_keys)(jnp.asarray(x))).astype(np.int64)
    assert keys[4] == keys[5]                                  # -0.0 is 0.0
    assert np.all(np.diff(np.delete(keys, 4)) > 0)


def _sampling(S, rng):
    s = arrays(S)
    return dataclasses.replace(
        s, top_k=jnp.asarray(rng.integers(0, 12, S), jnp.int32),
        top_p=jnp.asarray(rng.choice([1.0, 0.999, 0.9, 0.5, 0.1, 1e-6], S), jnp.float32),
        min_p=jnp.asarray(rng.choice([0.0, 0.05, 0.3], S), jnp.float32))


def _filter_batch(rng, data, S=8, V=96):
    """(logits f32[S, V], rows with filters): normal, rounded (ties at k and at the cutoff) or 30 % banned (-inf)
    logits; row 0's top_k above the vocabulary."""
    logits = rng.normal(size=(S, V)).astype(np.float32) * 3
    if data == "ties":
        logits = np.round(logits)
    if data == "banned":
        logits[rng.random((S, V)) < 0.3] = -np.inf
    s = _sampling(S, rng)
    return logits, dataclasses.replace(s, top_k=s.top_k.at[0].set(V + 5))


@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("data", ["normal", "ties", "banned"])
def test_sort_free_filters_keep_what_the_sorted_filters_keep(data, bits, monkeypatch):
    """A radix search over the logits' order keys finds the k-th largest logit and top-p's cutoff: the same tokens
    are kept, with the same values, as by the vocabulary sort, ties included (a row of rounded logits has many
    at the k-th value and at the cutoff) and with banned (-inf) ids; k above the vocabulary keeps all."""
    from pallas_kernels import sampling_thresholds
    monkeypatch.setattr(sampling_thresholds, "DIGIT_BITS", bits)      # a digit of 1, 4 or 8 bits a pass: the same
    rng = np.random.default_rng(["normal", "ties", "banned"].index(data))
    for _ in range(8):
        logits, s = _filter_batch(rng, data)
        want = np.asarray(apply_filters(jnp.asarray(logits), s))
        got = np.asarray(jax.jit(lambda lg, sa: apply_filters_sort_free(lg, sa))(jnp.asarray(logits), s))  # traced anew
        assert np.array_equal(np.isinf(got), np.isinf(want))
        np.testing.assert_array_equal(got[~np.isinf(got)], want[~np.isinf(want)])


@pytest.mark.parametrize("data", ["normal", "ties", "banned"])
def test_the_thresholds_passes_keep_what_the_sorted_filters_keep(data, monkeypatch):
    """The GPU's form of the sort-free filters (``sampling_thresholds_passes``, here interpreted), given the rows'
    maxima by the sampler: the sort's tokens, ties and banned ids included."""
    from pallas_kernels import sampling_thresholds
    monkeypatch.setattr(sampling_thresholds, "IMPL", "passes-interpret")
    rng = np.random.default_rng(["normal", "ties", "banned"].index(data))
    logits, s = _filter_batch(rng, data)
    for inv_t in (None, jnp.asarray(1.0 / rng.choice([0.3, 0.8, 1.0, 1.7], (len(logits), 1)), jnp.float32)):
        # unscaled logits and the rows' 1 / temperature: the passes scale as they read, the sort is given them scaled
        scaled = jnp.asarray(logits) if inv_t is None else jnp.asarray(logits) * inv_t
        want = np.asarray(apply_filters(scaled, s))
        got = np.asarray(apply_filters_sort_free(jnp.asarray(logits), s, inv_t))
        assert np.array_equal(np.isinf(got), np.isinf(want))
        np.testing.assert_array_equal(got[~np.isinf(got)], want[~np.isinf(want)])


@pytest.mark.gpu
def test_on_a_gpu_the_plain_variant_filters_with_the_passes_and_no_sort():
    """A GPU's ``plain`` and ``full`` find top-k's and top-p's thresholds by the passes (18 Triton calls; ``random``
    none); ``full`` sorts only for its top logprobs (``lax.top_k``)."""
    logits, s, history, _ = mixed_batch()
    args = (jnp.asarray(logits), s, tuple(jnp.asarray(x) for x in history))
    for variant in (RANDOM, PLAIN, FULL):
        text = jax.jit(lambda lg, sa, h, v=variant: sample(lg, lambda: h, sa, v)).lower(*args).as_text()
        assert lowered_count(text, "__gpu$xla.gpu.triton") == (0 if variant == RANDOM else 18), variant
        assert "stablehlo.sort" not in text
        assert ("topk" in text.lower() or "top_k" in text.lower()) == (variant == FULL)
    ids = np.asarray(_sample(logits, s, history, PLAIN)[0])
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    kept = np.isfinite(np.asarray(apply_filters(jnp.asarray(logits) / temp, s)))
    filtered = np.asarray(s.row_uses_filters()) & (np.asarray(s.temperature) > 0)
    assert all(kept[r, ids[r]] for r in np.flatnonzero(filtered))


def test_sort_free_top_logprobs_are_top_ks():
    rng = np.random.default_rng(3)
    lp = jax.nn.log_softmax(jnp.asarray(np.round(rng.normal(size=(6, 300)) * 2).astype(np.float32)), axis=-1)
    want = _top_logprobs(lp)
    got = jax.jit(top_logprobs_sort_free)(lp)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))    # ties: the lower id first
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    small = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 7)).astype(np.float32)), axis=-1)
    for a, b in zip(top_logprobs_sort_free(small), _top_logprobs(small)):      # a vocabulary under MAX_LOGPROBS
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("variant", [PLAIN, FULL])     # the variants that filter (greedy and random never sort)
def test_the_sort_free_sampler_draws_what_the_sorted_one_draws_and_holds_no_sort(variant):
    logits, s, history, _ = mixed_batch()
    sorted_text = jax.jit(lambda lg, sa, h: sample(lg, lambda: h, sa, variant)).trace(
        jnp.asarray(logits), s, tuple(jnp.asarray(x) for x in history)).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.sort" in sorted_text or "topk" in sorted_text.lower()     # what the sort-free form removes
    args = (jnp.asarray(logits), s, tuple(jnp.asarray(x) for x in history))
    free = jax.jit(lambda lg, sa, h: sample(lg, lambda: h, sa, variant, sort_free=True))
    for a, b in zip(free(*args), _sample(*args, variant)):
        if b is None:
            assert a is None
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    text = free.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.sort" not in text and "topk" not in text.lower() and "top_k" not in text.lower()


def test_sort_free_top_p_at_a_real_vocabulary_differs_only_by_rounding_at_its_boundary():
    """At 32,000 logits the two top-p's sum the mass in different orders: a row may keep one token more or less,
    and only a token whose mass before it (in sorted order) is within rounding of top_p."""
    rng = np.random.default_rng(5)
    S, V = 32, 32000
    logits = jnp.asarray(rng.normal(size=(S, V)).astype(np.float32) * 3)
    for top_p in (0.9, 0.999):
        s = dataclasses.replace(arrays(S, top_p=top_p), top_p=jnp.full((S,), top_p, jnp.float32))
        want = np.isfinite(np.asarray(apply_filters(logits, s)))
        got = np.isfinite(np.asarray(jax.jit(apply_filters_sort_free)(logits, s)))
        p = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
        for r in range(S):
            diff = np.flatnonzero(got[r] != want[r])
            assert diff.size <= 1, (top_p, r, diff)
            for i in diff:
                before = p[r][p[r] > p[r, i]].sum()
                assert abs(before - top_p) < 1e-4, (top_p, r, before)


def test_a_top_p_near_zero_keeps_the_top_token_in_both_forms():
    """A subnormal top-p (which the GPU flushes to zero) counts as TOP_P_FLOOR: the top token alone, not none (the
    sort) or all (the sort-free search, whose cutoff would wrap)."""
    logits = jnp.asarray(np.random.default_rng(6).normal(size=(3, 64)).astype(np.float32))
    for top_p in (1e-40, 1e-45, 1e-20):
        s = dataclasses.replace(arrays(3), top_p=jnp.full((3,), top_p, jnp.float32))
        for f in (apply_filters, apply_filters_sort_free):
            kept = np.isfinite(np.asarray(f(logits, s)))
            assert kept.sum(axis=-1).tolist() == [1, 1, 1], (f.__name__, top_p)
            assert np.array_equal(np.argmax(kept, -1), np.argmax(np.asarray(logits), -1))


def test_kernel_zeros_take_a_signed_anchor_only():
    from pallas_kernels.paged_decode import kernel_zeros
    z = jax.jit(lambda a: kernel_zeros((2, 3), jnp.bfloat16, a))(jnp.int32(4))
    assert z.dtype == jnp.bfloat16 and not np.asarray(z, np.float32).any()
    with pytest.raises(TypeError, match="signed integer, not uint32"):
        kernel_zeros((2,), jnp.float32, jnp.uint32(1))


def test_a_step_copy_is_its_input_in_a_buffer_of_its_own():
    from pallas_kernels.paged_decode import step_copy
    x = jnp.array([[-0.0, 1.5, jnp.nan], [jnp.inf, -2.0, 3.0]], jnp.float32)
    f = jax.jit(lambda x, a: step_copy(x, a))
    np.testing.assert_array_equal(np.asarray(f(x, jnp.int32(0))), np.asarray(x))
    assert np.signbit(np.asarray(f(x, jnp.int32(0)))[0, 0])            # -0.0 kept: a select, not an addition
    assert "select" in f.lower(x, jnp.int32(0)).compile().as_text()     # not folded away into the parameter
    with pytest.raises(TypeError, match="signed integer, not uint32"):
        step_copy(x, jnp.uint32(1))


def test_a_top_p_of_one_keeps_every_token_top_k_kept():
    """One logit far above the rest: the others' mass before them rounds to 1 in float32, which top_p 1 must not
    read as reaching it (both forms; before, the sort dropped most of them)."""
    logits = jnp.asarray(np.concatenate([[20.0], np.linspace(0.0, -1.0, 999)]).astype(np.float32))[None, :]
    s = dataclasses.replace(arrays(1, top_k=500), top_k=jnp.full((1,), 500, jnp.int32))
    for f in (apply_filters, apply_filters_sort_free):
        assert int(np.isfinite(np.asarray(f(logits, s))).sum()) == 500, f.__name__


def test_a_seeds_high_half_of_zero_draws_as_none():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    s = arrays(6, seeds=np.arange(6) + 77, index=np.arange(6))
    plain = np.asarray(_draw(logits, s)[0])
    zero_hi = np.asarray(_draw(logits, dataclasses.replace(s, seeds_hi=jnp.zeros(6, jnp.uint32)))[0])
    other_hi = [np.asarray(_draw(logits, dataclasses.replace(s, seeds_hi=jnp.full(6, h, jnp.uint32)))[0])
                for h in (1, 2, 3)]

    def expected(hi):   # drawn apart from the sampler: a 32-bit seed's key, a high half folded in where not 0
        out = []
        for r in range(6):
            key = jax.random.key(77 + r)
            if hi:
                key = jax.random.fold_in(key, hi)
            out.append(int(jax.random.categorical(jax.random.fold_in(key, r), jnp.asarray(logits[r]))))
        return out

    assert plain.tolist() == expected(0) and zero_hi.tolist() == expected(0)
    assert [o.tolist() for o in other_hi] == [expected(h) for h in (1, 2, 3)]
    assert any(not np.array_equal(plain, o) for o in other_hi)


def test_logit_bias_is_added_before_the_penalties():
    # Row 0 greedy: +3 on id 1 makes it the argmax. Row 1: a ban (-inf) and a bias on one row. Row 2 (full,
    # repetition penalty 2 on id 3, seen): vLLM V1 adds the bias first, so id 3's 1.0 + 1.0 halves to 1.0, under
    # id 0's 1.2; the penalty first would give 0.5 + 1.0 = 1.5 and id 3. Logprobs stay the raw distribution's.
    logits = np.array([[2.0, 0.0, 1.0, -1.0, 0.5],
                       [2.0, 1.9, 1.0, -1.0, 0.5],
                       [1.2, 0.0, 0.0, 1.0, 0.5]], np.float32)
    biased = np.array([[1, -1], [0, 2], [3, -1]], np.int32)
    bias = np.array([[3.0, 0.0], [-np.inf, 5.0], [1.0, 0.0]], np.float32)
    s = arrays(3, temperature=0.0, banned=biased)
    s = dataclasses.replace(s, bias=jnp.asarray(bias), repetition_penalty=jnp.asarray([1.0, 1.0, 2.0], jnp.float32),
                            use_penalties=np.bool_(True))
    history = (jnp.asarray([[0, 0], [0, 0], [3, 3]], jnp.int32), jnp.asarray([[False] * 2] * 2 + [[True] * 2]),
               jnp.zeros((3, 2), bool))
    ids, lp, _, _ = sample(jnp.asarray(logits), lambda: history, s, FULL)
    assert np.asarray(ids).tolist() == [1, 2, 0]
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
    assert np.allclose(np.asarray(lp), ref[np.arange(3), [1, 2, 0]], atol=1e-6)
    # without a bias array every biased id is a ban (what the runner's callers that only ban pass)
    ids = _draw(logits[:1], arrays(1, temperature=0.0, banned=np.array([[0, -1]], np.int32)))[0]
    assert int(np.asarray(ids)[0]) == 2
