"""pallas_kernels/add_rmsnorm.py: the fused residual add and RMSNorm against its reference and the model's ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_reference, block_rows, kernel_supported


def _inputs(t, d, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = (jax.random.normal(k[0], (t, d)) * 3).astype(dtype)
    delta = jax.random.normal(k[1], (t, d)).astype(dtype)
    w = (1 + 0.1 * jax.random.normal(k[2], (d,))).astype(dtype)
    return x, delta, w


@pytest.mark.parametrize("t", [1, 6, 16, 40])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_matches_reference(t, dtype):
    x, delta, w = _inputs(t, 128, dtype, seed=t)
    s_ref, h_ref = add_rmsnorm_reference(x, delta, w, eps=1e-5)
    s, h = add_rmsnorm(x, delta, w, eps=1e-5, impl="interpret")
    assert s.dtype == h.dtype == dtype and s.shape == h.shape == (t, 128)
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-6      # one bf16 rounding of the same float32 value
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(h_ref, np.float32), rtol=tol, atol=tol)


def test_reference_is_the_model_s_add_then_norm():
    from flax import nnx

    from jaxdyn.models.llama import RMSNorm
    x, delta, w = _inputs(8, 64, jnp.bfloat16)
    norm = RMSNorm(64, eps=1e-6, dtype=jnp.bfloat16)
    norm.weight[...] = w
    s, h = add_rmsnorm_reference(x, delta, w, eps=1e-6)
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(x + delta, np.float32))
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(norm(x + delta), np.float32))
    assert isinstance(norm, nnx.Module)


def test_rows_per_program_and_widths():
    assert [block_rows(t) for t in (1, 2, 3, 6, 16, 2048)] == [1, 2, 1, 2, 4, 4]
    assert kernel_supported(4096) and kernel_supported(16)
    assert not kernel_supported(3584) and not kernel_supported(8)
    x, delta, w = _inputs(4, 96, jnp.float32)
    with pytest.raises(ValueError, match="power of two"):
        add_rmsnorm(x, delta, w, eps=1e-5, impl="interpret")
    # auto on the CPU (or a width the kernel does not take) is the reference
    s, h = add_rmsnorm(x, delta, w, eps=1e-5)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(add_rmsnorm_reference(x, delta, w, eps=1e-5)[1]))
    with pytest.raises(ValueError, match="impl must be"):
        add_rmsnorm(x, delta, w, eps=1e-5, impl="cuda")


def test_warps_and_an_empty_batch():
    from pallas_kernels.add_rmsnorm import add_rmsnorm_kernel, warps_for
    assert [warps_for(br, 4096) for br in (1, 2, 4)] == [4, 8, 16]
    assert warps_for(1, 64) == 1 and warps_for(8, 8192) == 16
    x, delta, w = _inputs(1, 64, jnp.float32)
    s, h = add_rmsnorm_kernel(x[:0], delta[:0], w, eps=1e-5, interpret=True)
    assert s.shape == h.shape == (0, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 3, 16, 768, 2048])
def test_gpu_kernel_matches_reference_in_bf16(t):
    # the compiled kernel on the 8B shape's width: the same sum, the norm within one bf16 rounding
    x, delta, w = _inputs(t, 4096, jnp.bfloat16, seed=t)
    s_ref, h_ref = jax.jit(lambda *a: add_rmsnorm_reference(*a, eps=1e-5))(x, delta, w)
    s, h = jax.jit(lambda *a: add_rmsnorm(*a, eps=1e-5, impl="kernel"))(x, delta, w)
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
    h, h_ref = np.asarray(h, np.float32), np.asarray(h_ref, np.float32)
    assert np.isfinite(h).all()
    np.testing.assert_allclose(h, h_ref, rtol=1e-2, atol=1e-2)
    assert np.mean(h != h_ref) < 0.05, "more than a last-bit difference in many values"
