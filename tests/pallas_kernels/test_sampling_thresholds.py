"""Top-k's and top-p's thresholds without a sort: the Pallas kernel (interpret mode on the CPU, the device under
``-m gpu``) against the ``jax.numpy`` reference, whose tokens ``tests/jaxdyn/test_sampler.py`` checks against the
sort's."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sampling_thresholds import CHUNK_TILES, TILE, from_key, order_keys, sampling_thresholds

CHUNK = CHUNK_TILES * TILE


def _rows(rng, S, V, data):
    x = rng.normal(size=(S, V)).astype(np.float32) * 3
    if data == "ties":
        x = np.round(x)
    if data == "banned":
        x[rng.random((S, V)) < 0.3] = -np.inf
    k = rng.integers(1, V + 1, S).astype(np.int32)
    k[0] = V
    if S > 1:
        k[1] = 1
    p = rng.choice(np.array([1.0, 0.999, 0.9, 0.5, 0.1, 1e-30], np.float32), S)
    return jnp.asarray(x), jnp.asarray(k), jnp.asarray(p)


def _assert_the_exact_set_but_at_the_boundary(x, k, p, got):
    """top-p against the exact set (float64, sorted): equal but for tokens whose mass before them is within
    rounding of top_p (float32 sums in any order differ there)."""
    x64 = np.asarray(x, np.float64)
    for r in range(x.shape[0]):
        order = np.argsort(-x64[r], kind="stable")[:int(k[r])]
        order = order[np.isfinite(x64[r, order])]
        e = np.exp(x64[r, order] - x64[r, order[0]])
        before = (np.cumsum(e) - e) / e.sum()
        keep = (before < max(float(p[r]), 1e-30)) | (float(p[r]) >= 1.0)
        want = x64[r] >= x64[r, order[keep]].min()       # a cutoff's ties are kept, as the sampler's are
        near = np.isin(x64[r], x64[r, order[np.abs(before - float(p[r])) < 1e-5]])
        assert np.array_equal(got[r] & ~near, want & ~near), r


def _kept(x, kth, cutoff):
    keys = np.asarray(order_keys(x))
    return (keys >= np.asarray(kth)[:, None]) & (keys >= np.asarray(cutoff)[:, None]) & np.isfinite(np.asarray(x))


@pytest.mark.parametrize("V, impl", [(96, "interpret"), (TILE + 37, "interpret"), (3 * TILE, "interpret"),
                                     (96, "passes-interpret"), (CHUNK + 37, "passes-interpret")])
@pytest.mark.parametrize("data", ["normal", "ties", "banned"])
def test_the_interpreted_kernels_keep_what_the_reference_keeps(V, impl, data):
    """The k-th largest key exactly; top-p's cutoff keeps the exact (float64) set but for tokens within rounding
    of its boundary (each sums the kept mass in its own order), over rows shorter than a tile, ending
    inside one and ending at one (the passes: shorter than a chunk, and ending inside the second), with ties at k
    and at the cutoff, banned (-inf) logits, k = V and k = 1."""
    rng = np.random.default_rng(V + len(data))
    x, k, p = _rows(rng, 6, V, data)
    kth, cut = sampling_thresholds(x, k, p, impl="reference")
    kth_i, cut_i = sampling_thresholds(x, k, p, impl=impl)
    np.testing.assert_array_equal(np.asarray(kth_i), np.asarray(kth))
    _assert_the_exact_set_but_at_the_boundary(x, k, p, _kept(x, kth_i, cut_i))
    _assert_the_exact_set_but_at_the_boundary(x, k, p, _kept(x, kth, cut))
    # the k-th largest: k keys at or above it, fewer than k above it; k = V (top-k off): key 0, every key kept
    keys, kn, kth = np.asarray(order_keys(x)), np.asarray(k), np.asarray(kth)
    part = kn < V
    assert np.all(kth[~part] == 0)
    assert np.all((keys[part] >= kth[part][:, None]).sum(-1) >= kn[part])
    assert np.all((keys[part] > kth[part][:, None]).sum(-1) < kn[part])


@pytest.mark.parametrize("impl", ["reference", "interpret", "passes-interpret"])
def test_ties_at_the_kth_value_fill_k_in_top_ps_mass(impl):
    """Logits 2, 1, 1, 1, 1 with k = 2: top-p sees the 2 and one 1 (probabilities 0.73, 0.27), so top_p 0.7 keeps
    the 2 alone, as the sort does; counting every tie at the k-th value would make it keep all five."""
    from jaxdyn.engine.sampler import apply_filters
    from tests.jaxdyn.test_sampler import arrays
    x = jnp.asarray([[2.0, 1.0, 1.0, 1.0, 1.0]], jnp.float32)
    kth, cut = sampling_thresholds(x, jnp.asarray([2], jnp.int32), jnp.asarray([0.7], jnp.float32), impl=impl)
    assert _kept(x, kth, cut).tolist() == [[True, False, False, False, False]]
    import dataclasses
    s = dataclasses.replace(arrays(1), top_k=jnp.asarray([2], jnp.int32), top_p=jnp.asarray([0.7], jnp.float32))
    assert np.isfinite(np.asarray(apply_filters(x, s))).tolist() == [[True, False, False, False, False]]


@pytest.mark.parametrize("impl", ["interpret", "passes-interpret"])
def test_a_row_of_very_negative_logits_ending_inside_a_tile(impl):
    """exp(x - m) of the padding past the row must be 0 even where every real logit is far below 0 (m < -87)."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(3, TILE + 188)).astype(np.float32) - 120.0)
    k, p = jnp.asarray([TILE + 188, 40, 7], jnp.int32), jnp.asarray([0.9, 0.5, 0.99], jnp.float32)
    a = sampling_thresholds(x, k, p, impl="reference")
    b = sampling_thresholds(x, k, p, impl=impl)
    np.testing.assert_array_equal(np.asarray(b[0]), np.asarray(a[0]))
    np.testing.assert_array_equal(_kept(x, *b), _kept(x, *a))


@pytest.mark.parametrize("impl, calls", [("kernel", 1), ("passes", 18)])
def test_the_kernels_lower_to_triton_at_the_8b_vocabulary(impl, calls):
    """One call (one program a row), or a call a pass: 8 for top-k, the keys above the k-th, the kept mass, 8 for
    top-p, every pass one function of the module (lowered once: one kernel in the text), and no operand a
    constant fills (a memset on a GPU, which ends a CUDA graph)."""
    from tests.support import constant_filled_buffers, lowered_count
    sds = jax.ShapeDtypeStruct
    f = jax.jit(functools.partial(sampling_thresholds, impl=impl))
    traced = f.trace(sds((64, 128256), jnp.float32), sds((64,), jnp.int32), sds((64,), jnp.float32))
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert lowered_count(text, "__gpu$xla.gpu.triton") == calls
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert constant_filled_buffers(traced.jaxpr) == []


def test_the_passes_scale_and_floor_the_rows_as_they_read_them():
    """``scale`` and ``floor`` give the thresholds of the scaled rows with the logits under the floor dropped: what
    the reference finds over that array, made beforehand."""
    rng = np.random.default_rng(4)
    x, k, p = _rows(rng, 6, 700, "normal")
    scale = jnp.asarray([1.0, 0.5, 2.0, 1.25, 1 / 0.7, 10.0], jnp.float32)
    floor = jnp.asarray([-jnp.inf, 0.0, -3.0, 1.0, -jnp.inf, 5.0], jnp.float32)
    scaled = x * scale[:, None]
    dropped = jnp.where(scaled < floor[:, None], -jnp.inf, scaled)
    a = sampling_thresholds(dropped, k, p, impl="reference")
    b = sampling_thresholds(x, k, p, impl="passes-interpret", scale=scale, floor=floor,
                            row_max=jnp.max(scaled, axis=-1))
    np.testing.assert_array_equal(np.asarray(b[0]), np.asarray(a[0]))
    _assert_the_exact_set_but_at_the_boundary(dropped, k, p, _kept(dropped, *b))


def test_the_constant_check_sees_a_constant_passed_into_a_nested_jit():
    """The passes' calls sit inside nested jits: a constant handed to one is still a constant-filled operand of its
    call (what the lowering test asserts there is none of), and a zeros that is a kernel's output is not."""
    from jax.experimental import pallas as pl

    from pallas_kernels.paged_decode import kernel_zeros
    from tests.support import constant_filled_buffers

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    inner = jax.jit(lambda x: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                                             interpret=True)(x))
    flagged = jax.jit(lambda: inner(jnp.zeros((8,), jnp.float32))).trace().jaxpr
    assert len(constant_filled_buffers(flagged)) == 1
    clean = jax.jit(lambda a: inner(kernel_zeros((8,), jnp.float32, a))).trace(jnp.int32(1)).jaxpr
    assert constant_filled_buffers(clean) == []


def test_from_key_inverts_order_keys():
    x = jnp.asarray([-jnp.inf, -3.5, -1e-30, 0.0, 1e-37, 2.0, 3e38, jnp.inf], jnp.float32)
    np.testing.assert_array_equal(np.asarray(from_key(order_keys(x))), np.asarray(x))


def test_an_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl must be auto, passes, kernel, passes-interpret, interpret or "
                                         "reference, not 'fast'"):
        sampling_thresholds(jnp.zeros((1, 4)), jnp.ones((1,), jnp.int32), jnp.ones((1,)), impl="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["kernel", "passes"])
@pytest.mark.parametrize("rows", [1, 64, 300])
def test_gpu_kernels_keep_what_the_reference_keeps_at_the_8b_vocabulary(rows, impl):
    rng = np.random.default_rng(rows)
    x, k, p = _rows(rng, rows, 128256, "normal")
    kth, _ = jax.jit(functools.partial(sampling_thresholds, impl="reference"))(x, k, p)
    kth_k, cut_k = jax.jit(functools.partial(sampling_thresholds, impl=impl))(x, k, p)
    np.testing.assert_array_equal(np.asarray(kth_k), np.asarray(kth))
    _assert_the_exact_set_but_at_the_boundary(x, k, p, _kept(x, kth_k, cut_k))


def test_the_environment_may_choose_the_implementation(monkeypatch):
    import importlib

    from pallas_kernels import sampling_thresholds as st
    monkeypatch.setenv("JAXDYN_SAMPLING_THRESHOLDS", "reference")
    try:
        assert importlib.reload(st).IMPL == "reference"
        monkeypatch.setenv("JAXDYN_SAMPLING_THRESHOLDS", "fast")
        importlib.reload(st)
        with pytest.raises(ValueError, match="not 'fast'"):
            st.sampling_thresholds(jnp.zeros((1, 4)), jnp.ones((1,), jnp.int32), jnp.ones((1,)))
    finally:
        monkeypatch.delenv("JAXDYN_SAMPLING_THRESHOLDS")
        importlib.reload(st)
    assert st.IMPL == "auto"


@pytest.mark.parametrize("data", ["normal", "ties"])
def test_the_passes_skipping_settled_tiles_find_what_comparing_every_key_finds(data):
    """A pass adds a key above the answer's prefix to every candidate's sum and compares only the keys that share
    the prefix (a tile without one skips the comparisons): the same thresholds as comparing every key with every
    candidate, over rows of several chunks (most of their tiles skipped after the first passes)."""
    from pallas_kernels.sampling_thresholds import sampling_thresholds_passes
    rng = np.random.default_rng(11)
    x, k, p = _rows(rng, 5, 2 * CHUNK + 300, data)
    k = k.at[2].set(3).at[3].set(200)
    p = p.at[2].set(0.95).at[4].set(0.3)
    dense = sampling_thresholds_passes(x, k, p, interpret=True, skip=False)
    skipped = sampling_thresholds_passes(x, k, p, interpret=True)
    np.testing.assert_array_equal(np.asarray(skipped[0]), np.asarray(dense[0]))
    np.testing.assert_array_equal(_kept(x, *skipped), _kept(x, *dense))


def test_the_passes_take_tritons_warps_and_stages():
    """The probe's sweep: ``warps`` and ``stages`` reach every pass's Triton call (4 and 1 by default)."""
    from pallas_kernels.sampling_thresholds import sampling_thresholds_passes
    sds = jax.ShapeDtypeStruct
    args = (sds((8, 9000), jnp.float32), sds((8,), jnp.int32), sds((8,), jnp.float32))
    for kw, want in (({}, (1, 4)), ({"warps": 8, "stages": 3}, (3, 8))):
        text = jax.jit(functools.partial(sampling_thresholds_passes, **kw)).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
        assert {tuple(int(v) for v in m) for m in
                re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+)", text)} == {want}


@pytest.mark.parametrize("data", ["normal", "ties", "banned"])
def test_top_ps_search_within_its_bracket_finds_what_the_whole_search_finds(data):
    """Top-p's answer lies between max(k-th, the floor's key) - 1 and the row max's key: the digits those share are
    taken without reading the row (``bracket``), and the thresholds are those of the search over every digit, with
    top-k on and off, min-p floors and a temperature's scale; rows whose answer the bracket fixes almost wholly (k
    1 and 2) included."""
    from pallas_kernels.sampling_thresholds import sampling_thresholds_passes
    rng = np.random.default_rng(12 + len(data))
    x, k, p = _rows(rng, 8, CHUNK + 300, data)
    k = k.at[2].set(2).at[3].set(40).at[4].set(CHUNK + 300).at[5].set(7)
    p = p.at[:].set(jnp.asarray([0.9, 0.95, 0.99, 0.5, 0.8, 0.3, 0.999, 0.7], jnp.float32))
    scale = jnp.asarray([1.0, 1 / 0.7, 2.0, 1.0, 0.5, 1.0, 1.25, 1.0], jnp.float32)
    scaled = x * scale[:, None]
    m = jnp.max(scaled, axis=-1)
    floor = jnp.where(jnp.arange(8) % 2 == 0, m + jnp.log(0.05), -jnp.inf)
    args = dict(row_max=m, scale=scale, floor=floor, interpret=True)
    whole = sampling_thresholds_passes(x, k, p, bracket=False, **args)
    bracketed = sampling_thresholds_passes(x, k, p, **args)
    np.testing.assert_array_equal(np.asarray(bracketed[0]), np.asarray(whole[0]))
    np.testing.assert_array_equal(np.asarray(bracketed[1]), np.asarray(whole[1]))
    dropped = jnp.where(scaled < floor[:, None], -jnp.inf, scaled)
    _assert_the_exact_set_but_at_the_boundary(dropped, k, p, _kept(dropped, *bracketed))
