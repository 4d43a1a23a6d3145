"""Top-k's and top-p's thresholds without a sort: the Pallas kernel (interpret mode on the CPU, the device under
``-m gpu``) against the ``jax.numpy`` reference, whose tokens ``tests/jaxdyn/test_sampler.py`` checks against the
sort's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sampling_thresholds import TILE, order_keys, sampling_thresholds


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


def _kept(x, kth, cutoff):
    keys = np.asarray(order_keys(x))
    return (keys >= np.asarray(kth)[:, None]) & (keys >= np.asarray(cutoff)[:, None]) & np.isfinite(np.asarray(x))


@pytest.mark.parametrize("V", [96, TILE + 37, 3 * TILE])
@pytest.mark.parametrize("data", ["normal", "ties", "banned"])
def test_the_interpreted_kernel_keeps_what_the_reference_keeps(V, data):
    """The k-th largest key exactly; top-p's cutoff keeps the same tokens (both sum the kept mass, in other
    orders: at these sizes no token is within rounding of its boundary), over rows shorter than a tile, ending
    inside one and ending at one, with ties at k and at the cutoff, banned (-inf) logits, k = V and k = 1."""
    rng = np.random.default_rng(V + len(data))
    x, k, p = _rows(rng, 6, V, data)
    kth, cut = sampling_thresholds(x, k, p, impl="reference")
    kth_i, cut_i = sampling_thresholds(x, k, p, impl="interpret")
    np.testing.assert_array_equal(np.asarray(kth_i), np.asarray(kth))
    np.testing.assert_array_equal(_kept(x, kth_i, cut_i), _kept(x, kth, cut))
    # the k-th largest: k keys at or above it, fewer than k above it; k = V (top-k off): key 0, every key kept
    keys, kn, kth = np.asarray(order_keys(x)), np.asarray(k), np.asarray(kth)
    part = kn < V
    assert np.all(kth[~part] == 0)
    assert np.all((keys[part] >= kth[part][:, None]).sum(-1) >= kn[part])
    assert np.all((keys[part] > kth[part][:, None]).sum(-1) < kn[part])


@pytest.mark.parametrize("impl", ["reference", "interpret"])
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


def test_a_row_of_very_negative_logits_ending_inside_a_tile():
    """exp(x - m) of the padding past the row must be 0 even where every real logit is far below 0 (m < -87)."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(3, TILE + 188)).astype(np.float32) - 120.0)
    k, p = jnp.asarray([TILE + 188, 40, 7], jnp.int32), jnp.asarray([0.9, 0.5, 0.99], jnp.float32)
    a = sampling_thresholds(x, k, p, impl="reference")
    b = sampling_thresholds(x, k, p, impl="interpret")
    np.testing.assert_array_equal(np.asarray(b[0]), np.asarray(a[0]))
    np.testing.assert_array_equal(_kept(x, *b), _kept(x, *a))


def test_the_kernel_lowers_to_triton_at_the_8b_vocabulary():
    sds = jax.ShapeDtypeStruct
    f = jax.jit(functools.partial(sampling_thresholds, impl="kernel"))
    text = f.trace(sds((64, 128256), jnp.float32), sds((64,), jnp.int32), sds((64,), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_an_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl must be auto, kernel, interpret or reference, not 'fast'"):
        sampling_thresholds(jnp.zeros((1, 4)), jnp.ones((1,), jnp.int32), jnp.ones((1,)), impl="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 300])
def test_gpu_kernel_keeps_what_the_reference_keeps_at_the_8b_vocabulary(rows):
    rng = np.random.default_rng(rows)
    x, k, p = _rows(rng, rows, 128256, "normal")
    kth, _ = jax.jit(functools.partial(sampling_thresholds, impl="reference"))(x, k, p)
    kth_k, cut_k = jax.jit(functools.partial(sampling_thresholds, impl="kernel"))(x, k, p)
    np.testing.assert_array_equal(np.asarray(kth_k), np.asarray(kth))
    # top-p against the exact set (float64, sorted): equal but for tokens whose mass before them is within rounding
    # of top_p (the kernel's float32 sums, like any, differ there)
    got = _kept(x, kth_k, cut_k)
    x64 = np.asarray(x, np.float64)
    for r in range(rows):
        order = np.argsort(-x64[r], kind="stable")[:int(k[r])]
        e = np.exp(x64[r, order] - x64[r, order[0]])
        before = (np.cumsum(e) - e) / e.sum()
        want = np.zeros(x.shape[1], bool)
        want[order[before < float(p[r])]] = True
        near = np.zeros(x.shape[1], bool)
        near[order[np.abs(before - float(p[r])) < 1e-5]] = True
        assert np.array_equal(got[r] & ~near, want & ~near), r


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
