"""The fp8 Linear (w8a8): fp8 weights [out, in], activations quantized per token on the device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdyn.models.llama import FP8_MAX, Fp8Options, Linear, quantize_fp8


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


def _fp8_layer(n_in, n_out, *, bias=False, seed=1, **kw):
    layer = Linear(n_in, n_out, bias=bias, dtype=jnp.float32, quant="fp8", **kw)
    k = jax.random.split(jax.random.key(seed), 3)
    layer.weight[...] = (jax.random.normal(k[0], (n_out, n_in)) * 64).astype(jnp.float8_e4m3fn)
    layer.scale[...] = jax.random.uniform(k[1], (n_out,), minval=1e-3, maxval=1e-2)
    if bias:
        layer.bias[...] = jax.random.normal(k[2], (n_out,))
    return layer


def test_few_rows_take_the_fp8_weight_product_with_unquantized_activations():
    """A call of at most ``Fp8Options.kernel_rows`` rows multiplies the input as it is by the weights made x's dtype
    (w8a16, ``pallas_kernels.fp8_matmul``): nearer the exact product than w8a8, which quantizes each row."""
    from pallas_kernels.fp8_matmul import fp8_weight_matmul_reference
    layer = _fp8_layer(64, 48, bias=True)
    x = jax.random.normal(jax.random.key(9), (10, 64))
    w, s, b = layer.weight[...], layer.scale[...], np.asarray(layer.bias[...])
    few = layer(x, fp8=Fp8Options(kernel_rows=16))
    np.testing.assert_array_equal(np.asarray(few), np.asarray(fp8_weight_matmul_reference(x, w, s)) + b)
    many = layer(x, fp8=Fp8Options(kernel_rows=8))                       # 10 rows > 8: w8a8 as before
    np.testing.assert_array_equal(np.asarray(many), np.asarray(layer(x)))
    exact = np.asarray(x, np.float64) @ (np.asarray(w, np.float64) * np.asarray(s)[:, None]).T + b
    err_few, err_many = np.abs(np.asarray(few) - exact).max(), np.abs(np.asarray(many) - exact).max()
    assert err_few < 1e-4 * np.abs(exact).max() < err_many


@pytest.mark.parametrize("tp", [2, 4])
def test_few_rows_under_tensor_parallelism_match_one_device(tp):
    """The few-row product runs per shard (``shard_map``): column-split layers give each shard its output
    channels; row-split ones add the shards' float32 partial sums. Both equal the one-device result."""
    from flax import nnx
    from jax.sharding import NamedSharding

    from jaxdyn.parallel.sharding import make_mesh
    mesh = make_mesh(tp)
    x = jax.random.normal(jax.random.key(2), (16, 64))
    for split, spec in (("column", {"weight": P("model", None), "scale": P("model")}),
                        ("row", {"weight": P(None, "model"), "scale": P()})):
        one = _fp8_layer(64, 32, bias=True)
        want = np.asarray(one(x, fp8=Fp8Options(kernel_rows=16)))
        layer = _fp8_layer(64, 32, bias=True, mesh=mesh, split=split)
        graphdef, state = nnx.split(layer)
        state = jax.tree.map_with_path(
            lambda path, v: jax.device_put(v, NamedSharding(mesh, spec.get(str(path[0].key), P()))), state)
        x_spec = P() if split == "column" else P(None, "model")
        xs = jax.device_put(x, NamedSharding(mesh, x_spec))
        got = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, fp8=Fp8Options(kernel_rows=16)))(state, xs)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)   # float32 sums in another order
        text = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, fp8=Fp8Options(kernel_rows=16))).lower(state, xs).compile().as_text()
        assert ("all-reduce" in text) == (split == "row")      # row-split: one sum of the shards, nothing gathered
        assert "all-gather" not in text
    with pytest.raises(ValueError, match="split must be"):
        Linear(8, 8, bias=False, dtype=jnp.float32, quant="fp8", split="diagonal")


def test_few_rows_fall_back_where_the_kernel_does_not_apply():
    """A width tensor parallelism does not divide (the sharding rules leave the weight whole) takes the w8a8
    product rather than a shard_map it cannot split; so does a call of more rows than the kernel takes."""
    from flax import nnx
    from jax.sharding import NamedSharding

    from jaxdyn.parallel.sharding import make_mesh
    from pallas_kernels.fp8_matmul import FP8_KERNEL_MAX_ROWS
    mesh = make_mesh(4)
    for split, n_in, n_out in (("column", 64, 34), ("row", 34, 64)):
        x = jax.random.normal(jax.random.key(3), (16, n_in))
        layer = _fp8_layer(n_in, n_out, mesh=mesh, split=split)
        want = np.asarray(_fp8_layer(n_in, n_out)(x))                      # w8a8 on one device
        graphdef, state = nnx.split(layer)
        state = jax.tree.map(lambda v: jax.device_put(v, NamedSharding(mesh, P())), state)
        got = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, fp8=Fp8Options(kernel_rows=16)))(state, x)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    layer = _fp8_layer(64, 48)
    x = jax.random.normal(jax.random.key(4), (FP8_KERNEL_MAX_ROWS + 8, 64))
    np.testing.assert_array_equal(np.asarray(layer(x, fp8=Fp8Options(kernel_rows=4096))), np.asarray(layer(x)))


def test_runner_config_refuses_bad_fp8_options():
    from jaxdyn.engine.runner import RunnerConfig
    for bad in (dict(fp8_kernel_max_tokens=None), dict(fp8_kernel_max_tokens=-1),
                dict(fp8_fused_quantize="O_proj"), dict(fp8_fused_quantize=True),
                dict(fp8_fused_quantize_min_tokens=-3), dict(fp8_fused_quantize_min_tokens="auto")):
        with pytest.raises(ValueError, match="fp8_"):
            RunnerConfig(**bad)


@pytest.mark.parametrize("mlp_bias", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_quantize_mlp_matches_the_unfused_one(mlp_bias, dtype, monkeypatch):
    # fp8_fused_quantize="all": down_proj's input quantized by pallas_kernels.fp8_quantize (its reference on the
    # CPU); without biases from gate's and up's raw products and their scales (the scaled products never made)
    _check_fused_mlp(mlp_bias, dtype, 12, monkeypatch)


@pytest.mark.gpu
def test_gpu_fused_quantize_mlp_matches_the_unfused_one(monkeypatch):
    # the kernel itself (on a GPU quantize_rows_fp8 takes it), at widths of the 8B shape's
    _check_fused_mlp(False, jnp.bfloat16, 256, monkeypatch, hidden=4096, intermediate=14336)


def _check_fused_mlp(mlp_bias, dtype, rows, monkeypatch, hidden=None, intermediate=None):
    import dataclasses

    import jaxdyn.models.llama as llama
    from jaxdyn.config import ModelConfig
    from jaxdyn.models.llama import MLP
    from jaxdyn.models.presets import preset_config
    from pallas_kernels.fp8_matmul import FP8_KERNEL_MAX_ROWS
    cfg = dataclasses.replace(ModelConfig.from_dict(preset_config("tiny")), quantization="fp8", mlp_bias=mlp_bias)
    if hidden:
        cfg = dataclasses.replace(cfg, hidden_size=hidden, intermediate_size=intermediate)
    mlp = MLP(cfg, dtype=dtype)
    k = jax.random.split(jax.random.key(3), 8)
    for i, lin in enumerate((mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        lin.weight[...] = (jax.random.normal(k[i], lin.weight[...].shape) * 50).astype(jnp.float8_e4m3fn)
        lin.scale[...] = jax.random.uniform(k[3 + i], lin.scale[...].shape, minval=1e-3, maxval=1e-2)
        if mlp_bias:
            lin.bias[...] = jax.random.normal(k[6], lin.bias[...].shape, dtype) * 0.1
    x = jax.random.normal(k[7], (rows, cfg.hidden_size), dtype)
    calls = []
    real = llama.quantize_rows_fp8
    monkeypatch.setattr(llama, "quantize_rows_fp8", lambda *a, **kw: calls.append(kw.get("scales") is not None)
                        or real(*a, **kw))
    off = np.asarray(mlp(x), np.float32)
    fused = np.asarray(mlp(x, fp8=Fp8Options(fused_quantize="all")), np.float32)
    assert calls == [not mlp_bias]
    if dtype == jnp.float32:
        np.testing.assert_allclose(fused, off, rtol=1e-5, atol=1e-5 * np.abs(off).max())
    else:
        # silu(gate) * up rounded once in the kernel, twice in XLA's bf16 (silu first): a step of fp8 at most
        assert np.abs(fused - off).max() <= np.abs(off).max() / 8
        assert np.abs(fused - off).mean() <= 0.02 * np.abs(off).mean()
    # from fused_min_rows rows only
    calls.clear()
    np.testing.assert_array_equal(np.asarray(mlp(x, fp8=Fp8Options(fused_quantize="all", fused_min_rows=rows + 1))),
                                  np.asarray(mlp(x)))
    assert calls == []
    mlp(x, fp8=Fp8Options(fused_quantize="all", fused_min_rows=rows))
    assert calls == [not mlp_bias]
    # above the few-row kernel's limit only: a step the kernel takes stays unfused
    if rows <= FP8_KERNEL_MAX_ROWS:
        calls.clear()
        few = Fp8Options(kernel_rows=rows)
        np.testing.assert_array_equal(np.asarray(mlp(x, fp8=dataclasses.replace(few, fused_quantize="all"))),
                                      np.asarray(mlp(x, fp8=few)))
        assert calls == []
