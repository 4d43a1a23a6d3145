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
    k[0], k[1] = V, 1
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
    # the k-th largest: k keys at or above it, fewer than k above it
    keys = np.asarray(order_keys(x))
    assert np.all((keys >= np.asarray(kth)[:, None]).sum(-1) >= np.asarray(k))
    assert np.all((keys > np.asarray(kth)[:, None]).sum(-1) < np.asarray(k))


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
    kth, cut = jax.jit(functools.partial(sampling_thresholds, impl="reference"))(x, k, p)
    kth_k, cut_k = jax.jit(functools.partial(sampling_thresholds, impl="kernel"))(x, k, p)
    np.testing.assert_array_equal(np.asarray(kth_k), np.asarray(kth))
    # top-p's sums in other orders: at most one token a row apart, at its boundary
    assert (_kept(x, kth_k, cut_k) != _kept(x, kth, cut)).sum(-1).max() <= 1
