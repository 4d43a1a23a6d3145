"""Random weights in real shapes (--load-format dummy): deterministic, scaled, few compilations."""

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.dummy import init_dummy_weights
from jaxdyn.engine.compilation import compilation_count
from jaxdyn.config import ModelConfig
from jaxdyn.models.presets import preset_config
from jaxdyn.parallel.sharding import make_mesh


def test_dummy_weights_are_seeded_scaled_and_share_one_compilation_per_shape():
    cfg = ModelConfig.from_dict({**preset_config("tiny"), "num_hidden_layers": 8})
    mesh = make_mesh(1)
    before = compilation_count()
    a = init_dummy_weights(cfg, mesh, dtype=jnp.float32, seed=3)
    compiled = compilation_count() - before
    leaves = jax.tree_util.tree_leaves_with_path(a.state)
    kinds = {(tuple(x.shape), "norm" in jax.tree_util.keystr(p)) for p, x in leaves}
    # a generator per kind of tensor (+ a few eager ops deriving keys), not one per tensor
    assert len(leaves) > 50 and compiled <= len(kinds) + 6, (compiled, len(kinds), len(leaves))

    b = init_dummy_weights(cfg, mesh, dtype=jnp.float32, seed=3)
    c = init_dummy_weights(cfg, mesh, dtype=jnp.float32, seed=4)
    assert compilation_count() - before == compiled        # the same generators again
    for (path, x), y, z in zip(leaves, jax.tree.leaves(b.state), jax.tree.leaves(c.state)):
        name = jax.tree_util.keystr(path)
        x, y, z = np.asarray(x), np.asarray(y), np.asarray(z)
        np.testing.assert_array_equal(x, y, err_msg=name)
        if "norm" in name:
            assert np.all(x == 1), name
            continue
        assert not np.array_equal(x, z), name               # another seed, other values
        if x.ndim == 2 and "embed" not in name and x.size > 1000:
            np.testing.assert_allclose(x.std(), x.shape[0] ** -0.5, rtol=0.1, err_msg=name)


def test_quantized_dummy_weights_give_the_product_the_unquantized_spread():
    """fp8 weights [out, in] with values N(0, 1) and int8 kernels [in, out] with values N(0, 32), each with a
    constant scale per output channel that brings the product to N(0, 1/fan_in), as the bf16 matrices."""
    for quant in ("fp8", "int8"):
        cfg = ModelConfig.from_dict({**preset_config("tiny"), "jaxdyn_quantization": quant})
        up = init_dummy_weights(cfg, make_mesh(1), dtype=jnp.float32).state["layers"][0]["mlp"]["up_proj"]
        d, f = cfg.hidden_size, cfg.intermediate_size
        q = up["weight" if quant == "fp8" else "kernel"][...]
        scale = np.asarray(up["scale"][...])
        assert q.dtype == (jnp.float8_e4m3fn if quant == "fp8" else jnp.int8)
        assert q.shape == ((f, d) if quant == "fp8" else (d, f))
        spread = 1.0 if quant == "fp8" else 32.0
        np.testing.assert_allclose(np.asarray(q, np.float32).std(), spread, rtol=0.1)
        np.testing.assert_allclose(scale, 1 / (spread * d ** 0.5), rtol=1e-6)
