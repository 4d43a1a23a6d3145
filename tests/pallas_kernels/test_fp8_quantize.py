"""Rows quantized to fp8 in one kernel (``pallas_kernels.fp8_quantize``), optionally silu(gate) * up first."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.models.llama import quantize_fp8
from pallas_kernels.fp8_quantize import quantize_rows_fp8, quantize_rows_fp8_kernel, quantize_rows_fp8_reference


def _rows(t, f, seed=0, dtype=jnp.bfloat16):
    x = jax.random.normal(jax.random.key(seed), (t, f), jnp.float32) * 3.0
    return x.at[1, 7].set(-90.0).astype(dtype)


@pytest.mark.parametrize("t, f", [(16, 256), (5, 4096), (3, 96)])
def test_the_kernel_quantizes_as_the_model_does(t, f):
    x = _rows(t, f)
    q, s = quantize_rows_fp8(x, impl="interpret")
    want_q, want_s = quantize_fp8(x)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (t, f) and s.shape == (t, 1)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(want_s))
    np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(want_q, np.float32))
    assert float(s[1, 0]) == pytest.approx(90.0 / 448.0)
    # an all-zero row: a tiny scale, zeros
    q0, s0 = quantize_rows_fp8(jnp.zeros((4, 64), jnp.bfloat16), impl="interpret")
    assert np.all(np.asarray(q0, np.float32) == 0) and np.all(np.asarray(s0) > 0)


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("block_rows, block_cols", [(1, None), (2, 128)])
def test_one_pass_and_two_loops_agree_with_the_reference(one_pass, block_rows, block_cols):
    # 9 rows: with 2 a program the last program's second row is padding
    for gate in (None, _rows(9, 1024, seed=3)):
        x = _rows(9, 1024, seed=4)
        q, s = quantize_rows_fp8_kernel(x, gate, block_rows=block_rows, block_cols=block_cols,
                                        one_pass=one_pass, interpret=True)
        want_q, want_s = quantize_rows_fp8_reference(x, gate)
        assert q.shape == (9, 1024) and s.shape == (9, 1)
        np.testing.assert_array_equal(np.asarray(s), np.asarray(want_s))
        np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(want_q, np.float32))


@pytest.mark.parametrize("with_gate", [True, False])
def test_raw_products_are_scaled_in_the_kernel_as_the_model_scales_them(with_gate):
    # gate's and up's unscaled fp8 products, their rows' scale and each one's channel scales: the kernel makes
    # fp8_scaled_dot's epilogue itself, the same bf16 values, before silu(gate) * up
    from jaxdyn.models.llama import fp8_dot, fp8_scaled_dot
    t, k, f = 7, 64, 256
    x = _rows(t, k, seed=5)
    xq, sx = quantize_fp8(x)
    ws = [(jax.random.normal(jax.random.key(6 + i), (f, k)) * 40).astype(jnp.float8_e4m3fn) for i in range(2)]
    cs = [jax.random.uniform(jax.random.key(8 + i), (f,), minval=0.001, maxval=0.01) for i in range(2)]
    up_raw, gate_raw = (fp8_dot(xq, w, jnp.bfloat16) for w in ws)
    up, gate = (fp8_scaled_dot(xq, sx, w, c, jnp.bfloat16) for w, c in zip(ws, cs))
    if not with_gate:
        gate_raw = gate = None
    scales = (sx, cs[0], cs[1] if with_gate else None)
    want_q, want_s = quantize_rows_fp8_reference(up, gate)
    for q, s in (quantize_rows_fp8_reference(up_raw, gate_raw, scales),
                 quantize_rows_fp8(up_raw, gate_raw, scales=scales, impl="interpret"),
                 quantize_rows_fp8_kernel(up_raw, gate_raw, scales=scales, block_rows=2, one_pass=False,
                                          interpret=True)):
        np.testing.assert_array_equal(np.asarray(s), np.asarray(want_s))
        np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(want_q, np.float32))
    with pytest.raises(ValueError, match="scales must be"):
        quantize_rows_fp8(up_raw, gate_raw, scales=(sx[:3], cs[0], cs[1]), impl="interpret")
    with pytest.raises(ValueError, match="scales must be"):
        quantize_rows_fp8(up_raw, gate_raw, scales=(sx, cs[0]), impl="interpret")


def test_silu_gate_times_up_is_made_in_the_kernel():
    g, u = _rows(10, 512, seed=1), _rows(10, 512, seed=2)
    q, s = quantize_rows_fp8(u, g, impl="interpret")
    h = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(jnp.bfloat16)
    want_q, want_s = quantize_fp8(h)
    np.testing.assert_allclose(np.asarray(s), np.asarray(want_s), rtol=1e-6)
    back = np.asarray(q, np.float32) * np.asarray(s)
    hf = np.asarray(h, np.float32)
    assert np.abs(back - hf).max() <= np.abs(hf).max() / 16        # e4m3: within a 1/16 step of the row's max
    ref_q, ref_s = quantize_rows_fp8_reference(u, g)
    np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(ref_q, np.float32))


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ"):
        quantize_rows_fp8(_rows(4, 64), _rows(4, 32), impl="interpret")
    with pytest.raises(ValueError, match=r"\[T, F\]"):
        quantize_rows_fp8(jnp.zeros((2, 3, 64)), impl="interpret")
    with pytest.raises(ValueError, match="impl must be"):
        quantize_rows_fp8(_rows(4, 64), impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("one_pass", [True, False])
def test_gpu_the_kernel_on_the_8b_widths(one_pass):
    for f, t, with_gate, scaled in itertools.product((4096, 14336), (16, 2048), (True, False), (False, True)):
        g, u = (_rows(t, f, seed=t) if with_gate else None), _rows(t, f, seed=t + 1)
        sc = None
        if scaled:      # raw products' scales: rows' and each input's channels'
            sc = (jax.random.uniform(jax.random.key(t), (t, 1), minval=0.5, maxval=2.0),
                  jax.random.uniform(jax.random.key(f), (f,), minval=0.01, maxval=0.1),
                  jax.random.uniform(jax.random.key(f + 1), (f,), minval=0.01, maxval=0.1) if with_gate else None)
        q, s = jax.jit(lambda u, g, sc: quantize_rows_fp8_kernel(u, g, one_pass=one_pass, scales=sc))(u, g, sc)
        rq, rs = quantize_rows_fp8_reference(u, g, sc)
        np.testing.assert_allclose(np.asarray(s), np.asarray(rs), rtol=1e-6)
        assert (np.asarray(q, np.float32) != np.asarray(rq, np.float32)).mean() < 1e-3


@pytest.mark.parametrize("rows", [16, 2048])
@pytest.mark.parametrize("inputs", ["x", "gate", "raw products"])
def test_the_kernel_lowers_to_triton_for_a_gpu(rows, inputs):
    """The kernel as the engine calls it (the 8B shape's down_proj input) lowers through Pallas' Triton lowering on
    the CPU, so a construct it rejects fails here rather than on the device."""
    sds = jax.ShapeDtypeStruct
    x = sds((rows, 14336), jnp.bfloat16)
    scales = (sds((rows, 1), jnp.float32), sds((14336,), jnp.float32), sds((14336,), jnp.float32))
    kw = {"x": {}, "gate": {"gate": x}, "raw products": {"gate": x, "scales": scales}}[inputs]
    f = jax.jit(lambda x, gate=None, scales=None: quantize_rows_fp8(x, gate, scales=scales, impl="kernel"))
    assert "__gpu$xla.gpu.triton" in f.trace(x, **kw).lower(lowering_platforms=("cuda",)).as_text()


def test_the_mlp_input_takes_sixteen_warps_and_the_attention_output_eight():
    """``MLP_WARPS`` / ``ROW_WARPS``: the warps a program the entry point asks Triton for (in the lowered call)."""
    import re
    from pallas_kernels.fp8_quantize import MLP_WARPS, ROW_WARPS
    sds = jax.ShapeDtypeStruct
    x = sds((64, 4096), jnp.bfloat16)

    def warps(**kw):
        f = jax.jit(lambda x, gate=None: quantize_rows_fp8(x, gate, impl="kernel"))
        return [int(w) for w in re.findall(r"num_warps = (\d+) : i32", f.trace(x, **kw).lower(
            lowering_platforms=("cuda",)).as_text())]
    assert (MLP_WARPS, ROW_WARPS) == (16, 8)
    assert warps(gate=x) == [MLP_WARPS] and warps() == [ROW_WARPS]


def test_the_kernel_is_lowered_once_for_calls_of_one_shape(monkeypatch):
    """A pallas_call outside a jit is lowered to Triton at every call; the kernel is jitted, so a step whose layers
    call it with the same shapes lowers it once (in an 8B step of 2,048 tokens its 64 calls had taken 3.6 s of the
    warm-up's serial lowering on a 2-core CPU; ``benchmarks/lowering_time.py``)."""
    from jax._src.pallas.triton import lowering as triton_lowering
    from pallas_kernels import fp8_quantize
    lowered = []
    lower = triton_lowering.lower_jaxpr_to_triton_module
    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module",
                        lambda *a, **k: lowered.append(1) or lower(*a, **k))
    monkeypatch.setattr(fp8_quantize, "on_gpu", lambda: True)

    def layers(x, g):
        for _ in range(4):
            q, s = fp8_quantize.quantize_rows_fp8(x, g)
            x = x + (q.astype(jnp.float32) * s).astype(x.dtype)
        return x

    args = (jax.ShapeDtypeStruct((16, 256), jnp.bfloat16), jax.ShapeDtypeStruct((16, 256), jnp.bfloat16))
    jax.jit(layers).trace(*args).lower(lowering_platforms=("cuda",))
    assert len(lowered) == 1
