"""``pallas_kernels.rms_norm_fp8``: the residual add, RMSNorm and per-row fp8 quantization in one kernel."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rms_norm_fp8 import (add_rms_norm_fp8, add_rms_norm_fp8_kernel, add_rms_norm_fp8_reference,
                                         rms_norm_reference)


def _inputs(t, d, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (t, d), jnp.bfloat16) * 2
    x = x.at[0, d // 3].set(-37.0)                    # a row whose maximum is one outlier
    raw = (jax.random.normal(k[1], (t, d)) * 300).astype(jnp.bfloat16)     # an fp8 product's raw result
    rs = jax.random.uniform(k[2], (t, 1), minval=1e-3, maxval=1e-2)
    cs = jax.random.uniform(k[3], (d,), minval=0.5, maxval=2.0)
    w = (1 + 0.2 * jax.random.normal(k[4], (d,))).astype(jnp.bfloat16)
    return x, (raw, rs, cs), w


def _bits(a):
    return np.asarray(a.view(jnp.uint8) if a.dtype == jnp.float8_e4m3fn else a.astype(jnp.float32))


def _check(got, want, rtol):
    """h the same bits; the scales within ``rtol`` (the float32 sum of squares in another order); an fp8 value at
    most one code from the reference's, and few of them (a scale an ulp apart moves a value on a rounding tie)."""
    (h, q, s), (rh, rq, rs) = got, want
    np.testing.assert_array_equal(_bits(h), _bits(rh))
    np.testing.assert_allclose(np.asarray(s), np.asarray(rs), rtol=rtol)
    codes = np.abs(_bits(q).astype(np.int32) - _bits(rq).astype(np.int32))
    assert codes.max() <= 1 and (codes != 0).sum() <= max(2, codes.size // 1000), (codes != 0).sum()


@pytest.mark.parametrize("t,d", [(1, 256), (5, 384), (3, 4096), (4, 5120)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_the_kernel_in_interpret_mode_is_the_reference(t, d, with_delta):
    # widths of one block, of several (384: 3 x 128; 5,120: 5 x 1,024), rows 1-5; one row a program and all rows
    # in one
    x, delta, w = _inputs(t, d, seed=t)
    delta = delta if with_delta else None
    got = add_rms_norm_fp8(x, w, 1e-5, delta, impl="interpret")
    want = add_rms_norm_fp8_reference(x, w, 1e-5, delta)
    assert [a.shape for a in got] == [(t, d), (t, d), (t, 1)]
    assert [a.dtype for a in got] == [jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32]
    _check(got, want, 1e-6)
    _check(add_rms_norm_fp8_kernel(x, w, delta, eps=1e-5, block_rows=t, interpret=True), want, 1e-6)


def test_the_reference_is_the_model_s_unfused_layer_input():
    """h is x plus the product as ``fp8_scaled_dot`` scales it; (q, s) are ``quantize_fp8`` of the model's RMSNorm
    of h: the unfused layer's own operations, so a model with the fused path through the reference generates the
    same tokens (``tests/jaxdyn/test_fused_norm.py``)."""
    from jaxdyn.models.llama import RMSNorm, fp8_scale, quantize_fp8
    x, (raw, rs, cs), w = _inputs(6, 256)
    norm = RMSNorm(256, eps=1e-6, dtype=jnp.bfloat16)
    norm.weight[...] = w
    h, q, s = add_rms_norm_fp8_reference(x, w, 1e-6, (raw, rs, cs))
    np.testing.assert_array_equal(_bits(h), _bits(x + fp8_scale(raw, rs, cs, jnp.bfloat16)))
    wq, ws = quantize_fp8(norm(h))
    np.testing.assert_array_equal(_bits(q), _bits(wq))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(ws))
    np.testing.assert_array_equal(_bits(rms_norm_reference(h, w, 1e-6)), _bits(norm(h)))
    # and the values are the normalized row: q * s within fp8's rounding of y
    y = np.asarray(norm(h), np.float32)
    back = np.asarray(q, np.float32) * np.asarray(s)
    big = np.abs(y) >= 2.0 ** -6 * np.asarray(s)
    np.testing.assert_array_less(np.abs(back - y)[big], np.abs(y)[big] / 16 + 1e-6)
    assert np.asarray(s)[0, 0] == pytest.approx(np.abs(y[0]).max() / 448, rel=1e-6)


def test_bad_inputs_are_refused_and_odd_widths_take_the_reference():
    x, (raw, rs, cs), w = _inputs(4, 256)
    with pytest.raises(ValueError, match="raw, row_scale, col_scale"):
        add_rms_norm_fp8(x, w, 1e-5, (raw, rs), impl="interpret")
    with pytest.raises(ValueError, match="channel scales"):
        add_rms_norm_fp8(x, w, 1e-5, (raw, rs, cs[:128]), impl="interpret")
    with pytest.raises(ValueError, match="raw"):
        add_rms_norm_fp8(x, w, 1e-5, (raw[:2], rs, cs), impl="reference")
    with pytest.raises(ValueError, match="x must be"):
        add_rms_norm_fp8(x[0], w, 1e-5)
    with pytest.raises(ValueError, match="impl"):
        add_rms_norm_fp8(x, w, 1e-5, impl="triton")
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm_fp8_kernel(x, w[:128], eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="block_rows"):
        add_rms_norm_fp8_kernel(x, w, eps=1e-5, block_rows=3, interpret=True)
    # a width that is not a multiple of 16 (no power-of-two blocks tile it): the reference, the same values
    x, delta, w = _inputs(3, 40)
    for a, b in zip(add_rms_norm_fp8(x, w, 1e-5, delta, impl="interpret"), add_rms_norm_fp8_reference(x, w, 1e-5, delta)):
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.gpu
def test_gpu_the_kernel_on_the_8b_width():
    """On the GPU (Triton's sums in their own order, its division): h the same bits, the scales within float32's
    rounding, at most 1 in 1,000 fp8 values a code apart; one jitted call, as the model makes it."""
    for t, with_delta in itertools.product((16, 2048), (False, True)):
        x, delta, w = _inputs(t, 4096, seed=t)
        delta = delta if with_delta else None
        h, q, s = jax.jit(lambda x, w, delta: add_rms_norm_fp8(x, w, 1e-5, delta, impl="kernel"))(x, w, delta)
        _check((h, q, s), add_rms_norm_fp8_reference(x, w, 1e-5, delta), 1e-5)

