"""The few-row fp8-weight product (``pallas_kernels.fp8_matmul``): kernel (interpret mode) against float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_matmul import (
    Fp8MatmulBlocks, fp8_matmul_blocks, fp8_weight_matmul, fp8_weight_matmul_reference)


def _operands(m, n, k, dtype=jnp.bfloat16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(ks[0], (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(ks[1], (n, k)) * 64).astype(jnp.float8_e4m3fn)
    scale = jax.random.uniform(ks[2], (n,), minval=1e-3, maxval=1e-2)
    return x, w, scale


def _exact(x, w, scale):
    return (np.asarray(x, np.float64) @ np.asarray(w, np.float64).T) * np.asarray(scale, np.float64)


@pytest.mark.parametrize("m, n, k, blocks", [
    (16, 128, 256, None),                                   # one K step a program
    (5, 96, 512, None),                                     # rows padded to 16; 32-channel blocks
    (40, 256, 1024, Fp8MatmulBlocks(64, 128, 2)),           # rows padded to 64; K split in two
    (16, 64, 2048, Fp8MatmulBlocks(16, 64, 4, num_stages=2)),
])
def test_the_kernel_is_the_weights_made_bf16_times_the_rows(m, n, k, blocks):
    x, w, scale = _operands(m, n, k)
    out = fp8_weight_matmul(x, w, scale, impl="interpret", blocks=blocks)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    want = _exact(x, w, scale)
    # float32 accumulation, one bf16 rounding at the end
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2 ** -7, atol=1e-3 * np.abs(want).max())
    ref = fp8_weight_matmul_reference(x, w, scale)
    assert np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32)).max() <= 2 ** -7 * np.abs(want).max()


def test_float32_partial_sums_for_a_row_split_product():
    # out_dtype float32: the shards of a row-parallel product add their partial sums before the one rounding
    x, w, scale = _operands(16, 64, 512, seed=3)
    for blocks in (Fp8MatmulBlocks(64, 128, 1), Fp8MatmulBlocks(32, 128, 2)):
        out = fp8_weight_matmul(x, w, scale, impl="interpret", blocks=blocks, out_dtype=jnp.float32)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out, np.float64), _exact(x, w, scale), rtol=1e-5, atol=1e-5)


def test_float32_activations():
    x, w, scale = _operands(8, 32, 64, dtype=jnp.float32, seed=4)
    out = fp8_weight_matmul(x, w, scale, impl="interpret")
    np.testing.assert_allclose(np.asarray(out, np.float64), _exact(x, w, scale), rtol=1e-5, atol=1e-5)


def test_blocks_divide_the_8b_shapes_and_fill_the_gpu():
    # Llama-3.1-8B's fp8 products at TP 1: q/k/v merged, o, gate (= up), down
    for n, k in ((6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336)):
        for m in (16, 64):
            b = fp8_matmul_blocks(m, n, k)
            assert n % b.block_n == 0 and k % (b.block_k * b.split_k) == 0, (m, n, k, b)
            assert (n // b.block_n) * b.split_k >= 132, (m, n, k, b)          # a program for every SM at least
            assert k // b.split_k >= 1024                                     # and a loop worth pipelining
    assert fp8_matmul_blocks(16, 48, 64) == Fp8MatmulBlocks(block_n=16, block_k=64, split_k=1)


def test_shapes_the_kernel_cannot_take():
    x, w, scale = _operands(4, 24, 40)            # N, K not multiples of 16: the reference
    out = fp8_weight_matmul(x, w, scale, impl="interpret")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(fp8_weight_matmul_reference(x, w, scale), np.float32))
    x, w, scale = _operands(4, 64, 128)
    with pytest.raises(ValueError, match="do not divide"):
        fp8_weight_matmul(x, w, scale, impl="interpret", blocks=Fp8MatmulBlocks(64, 128, 2))
    with pytest.raises(ValueError, match="shapes do not match"):
        fp8_weight_matmul(x, w[:, :64], scale, impl="interpret")
    with pytest.raises(ValueError, match="impl must be"):
        fp8_weight_matmul(x, w, scale, impl="triton")


@pytest.mark.gpu
def test_gpu_the_kernel_on_the_8b_shapes():
    for n, k in ((6144, 4096), (4096, 14336)):
        for m in (1, 16, 64):
            x, w, scale = _operands(m, n, k, seed=m)
            out = jax.jit(lambda x, w, s: fp8_weight_matmul(x, w, s, impl="kernel"))(x, w, scale)
            want = _exact(x, w, scale)
            np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2 ** -7, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("blocks", [Fp8MatmulBlocks(64, 128, 1, swap=True), Fp8MatmulBlocks(32, 128, 2, swap=True),
                                    Fp8MatmulBlocks(64, 64, 2)])
def test_fp8_activations_and_the_swapped_product(blocks):
    """``swap``: the tiles multiplied as ``w @ x.T`` (the channels on the MMA's M side), the same result. fp8
    activations with their rows' scales: one fp8 x fp8 product a tile (w8a8), scaled by rows and channels."""
    from jaxdyn.models.llama import quantize_fp8
    x, w, scale = _operands(12, 128, 256, seed=5)
    out = fp8_weight_matmul(x, w, scale, impl="interpret", blocks=blocks)
    np.testing.assert_allclose(np.asarray(out, np.float64), _exact(x, w, scale), rtol=2 ** -7,
                               atol=1e-3 * np.abs(_exact(x, w, scale)).max())
    xq, sx = quantize_fp8(x)
    out = fp8_weight_matmul(xq, w, scale, impl="interpret", blocks=blocks, x_scale=sx, out_dtype=jnp.bfloat16)
    want = _exact(xq, w, scale) * np.asarray(sx, np.float64)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2 ** -7, atol=1e-3 * np.abs(want).max())
    with pytest.raises(ValueError, match="need x_scale"):
        fp8_weight_matmul(xq, w, scale, impl="interpret", blocks=blocks)


@pytest.mark.parametrize("activations", ["bf16", "fp8"])
def test_the_kernel_lowers_to_triton_for_a_gpu(activations):
    """w8a16 and w8a8 at 16 rows of the 8B shape's o_proj lower through Pallas' Triton lowering on the CPU."""
    sds = jax.ShapeDtypeStruct
    w, scale = sds((4096, 4096), jnp.float8_e4m3fn), sds((4096,), jnp.float32)
    if activations == "bf16":
        f = jax.jit(lambda x, w, s: fp8_weight_matmul(x, w, s, impl="kernel"))
        lowered = f.trace(sds((16, 4096), jnp.bfloat16), w, scale)
    else:
        f = jax.jit(lambda x, w, s, xs: fp8_weight_matmul(x, w, s, impl="kernel", out_dtype=jnp.bfloat16, x_scale=xs))
        lowered = f.trace(sds((16, 4096), jnp.float8_e4m3fn), w, scale, sds((16,), jnp.float32))
    assert "__gpu$xla.gpu.triton" in lowered.lower(lowering_platforms=("cuda",)).as_text()


def test_the_kernel_is_lowered_once_for_calls_of_one_shape(monkeypatch):
    """As the quantization kernel: jitted, so the layers' calls of one shape lower it to Triton once."""
    from jax._src.pallas.triton import lowering as triton_lowering
    from pallas_kernels import fp8_matmul
    lowered = []
    lower = triton_lowering.lower_jaxpr_to_triton_module
    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module",
                        lambda *a, **k: lowered.append(1) or lower(*a, **k))
    monkeypatch.setattr(fp8_matmul, "on_gpu", lambda: True)

    def layers(x, w, s):
        for _ in range(4):
            x = x + fp8_matmul.fp8_weight_matmul(x, w, s)
        return x

    sds = jax.ShapeDtypeStruct
    jax.jit(layers).trace(sds((16, 256), jnp.bfloat16), sds((256, 256), jnp.float8_e4m3fn),
                          sds((256,), jnp.float32)).lower(lowering_platforms=("cuda",))
    assert len(lowered) == 1
