"""The fp8 Linear (w8a8): fp8 weights [out, in], activations quantized per token on the device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.models.llama import FP8_MAX, Linear, quantize_fp8


def test_activations_quantize_to_fp8_with_one_scale_a_row_from_its_maximum():
    x = jax.random.normal(jax.random.key(0), (16, 64)) * 3.0
    x = x.at[3, 5].set(-40.0)
    q, s = quantize_fp8(x)
    s = np.asarray(s)
    assert q.dtype == jnp.float8_e4m3fn and s.shape == (16, 1)
    assert s[3, 0] == pytest.approx(40.0 / FP8_MAX)
    np.testing.assert_allclose(s[:, 0], np.abs(np.asarray(x)).max(axis=1) / FP8_MAX, rtol=1e-6)
    back = np.asarray(q, np.float32) * s
    assert back[3, 5] == pytest.approx(-40.0)
    # e4m3: 3 mantissa bits, a relative error of at most 1/16 where the value is normal (>= 2^-6 * its scale)
    normal = np.abs(np.asarray(x)) >= 2.0 ** -6 * s
    np.testing.assert_array_less(np.abs(back - np.asarray(x))[normal], np.abs(np.asarray(x))[normal] / 16 + 1e-6)
    assert np.all(np.isfinite(np.asarray(quantize_fp8(jnp.zeros((2, 3)))[0], np.float32)))
    # a row's quantization is its own: the same row beside other rows quantizes alike
    q1, s1 = quantize_fp8(x[:1])
    np.testing.assert_array_equal(np.asarray(q1, np.float32), np.asarray(q, np.float32)[:1])


def test_the_fp8_product_is_the_two_quantized_operands_times_their_scales():
    layer = Linear(64, 48, bias=True, dtype=jnp.float32, quant="fp8")
    assert layer.kernel is None and layer.weight[...].shape == (48, 64)
    k = jax.random.split(jax.random.key(1), 4)
    w = jax.random.normal(k[0], (48, 64)).astype(jnp.float8_e4m3fn)
    scale = jax.random.uniform(k[1], (48,), minval=0.01, maxval=0.1)
    bias = jax.random.normal(k[2], (48,))
    layer.weight[...], layer.scale[...], layer.bias[...] = w, scale, bias
    x = jax.random.normal(k[3], (10, 64))
    y = layer(x)
    xq, sx = quantize_fp8(x)
    want = (np.asarray(xq, np.float64) * np.asarray(sx)) @ (np.asarray(w, np.float64) * np.asarray(scale)[:, None]).T
    np.testing.assert_allclose(np.asarray(y), want + np.asarray(bias), rtol=1e-5, atol=1e-5)
    # within fp8's error of the unquantized product
    exact = np.asarray(x, np.float64) @ (np.asarray(w, np.float64) * np.asarray(scale)[:, None]).T
    assert np.abs(np.asarray(y) - np.asarray(bias) - exact).max() < 0.1 * np.abs(exact).max()


def _compiled_text(layer, x) -> str:
    from flax import nnx
    graphdef, state = nnx.split(layer)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).compile().as_text()


def test_the_fp8_layer_compiles_on_any_backend():
    text = _compiled_text(Linear(64, 32, bias=False, dtype=jnp.float32, quant="fp8"), jnp.ones((4, 64)))
    assert "f8e4m3fn" in text


@pytest.mark.gpu
def test_gpu_the_fp8_product_is_cublaslt_s_fp8_matmul_with_no_transpose():
    # weights [out, in]: the layout cuBLASLt's fp8 products take; [in, out] was transposed on every call
    text = _compiled_text(Linear(4096, 14336, bias=False, dtype=jnp.bfloat16, quant="fp8"),
                          jnp.ones((128, 4096), jnp.bfloat16))
    assert "__cublas$lt$matmul$f8" in text
    assert " transpose(" not in text
