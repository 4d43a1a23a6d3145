"""Random weights in the real shapes, generated on the devices in their target sharding."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from checkpoints.hf import LoadedModel, _path_keys
from jaxdyn.config import ModelConfig
from jaxdyn.models.registry import build_abstract_model
from jaxdyn.parallel.sharding import param_shardings


@functools.lru_cache(maxsize=None)
def _maker(shape: tuple[int, ...], dtype, kind: str, scale: float, sharding):
    """One compiled generator per (shape, kind, scale, sharding): the 32 layers of an 8B model
    share ~10 of them instead of compiling one per tensor (291 compilations, ~15 s on a GPU)."""
    def make(key):
        if kind == "ones":
            return jnp.ones(shape, dtype)
        if kind == "const":
            return jnp.full(shape, scale, dtype)
        if jnp.issubdtype(dtype, jnp.integer):        # an int8 kernel: rounded, within quantize's +-127
            return jnp.clip(jnp.round(scale * jax.random.normal(key, shape, jnp.float32)), -127, 127).astype(dtype)
        if kind == "bias":
            return 0.02 * jax.random.normal(key, shape, dtype)
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.jit(make, out_shardings=sharding)


# the spread of a quantized kernel's values (its scale brings the product to N(0, 1/fan_in)): fp8 values N(0, 1),
# int8 values N(0, 32) (rounded to integers)
_QUANT_SPREAD = {jnp.dtype(jnp.float8_e4m3fn): 1.0, jnp.dtype(jnp.int8): 32.0}


def init_dummy_weights(cfg: ModelConfig, mesh, *, dtype=None, seed: int = 0, abstract=None) -> LoadedModel:
    """Norms at 1, biases small, matrices N(0, 1/fan_in): activations stay finite at any depth (a quantized
    kernel's values spread over its type's range, its per-channel scale 1/(spread * sqrt(fan_in))).
    ``abstract``: ``build_abstract_model(cfg, mesh, dtype)`` when the caller has built it already."""
    t0 = time.perf_counter()
    dtype = jnp.dtype(dtype or cfg.dtype)
    graphdef, abstract = abstract or build_abstract_model(cfg, mesh, dtype)
    shardings = param_shardings(abstract, mesh)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    flat_shardings = jax.tree.leaves(shardings)
    names = ["/".join(map(str, _path_keys(path))) for path, _ in leaves]
    # a quantized Linear's (spread, fan_in), by module path: an fp8 weight is [out, in], an int8 kernel [in, out]
    quant = {}
    for name, (_, leaf) in zip(names, leaves):
        module, _, last = name.rpartition("/")
        if last in ("weight", "kernel") and jnp.dtype(leaf.dtype) in _QUANT_SPREAD:
            quant[module] = (_QUANT_SPREAD[jnp.dtype(leaf.dtype)], leaf.shape[1 if last == "weight" else 0])
    out = []
    for i, ((path, leaf), sharding, name) in enumerate(zip(leaves, flat_shardings, names)):
        key = jax.random.fold_in(jax.random.key(seed), i)
        module, _, last = name.rpartition("/")
        leaf_dtype = dtype
        if module in quant and last in ("weight", "kernel", "scale"):
            spread, fan_in = quant[module]
            leaf_dtype = leaf.dtype
            kind, scale = ("const", 1.0 / (spread * fan_in ** 0.5)) if last == "scale" else ("matrix", spread)
        elif "norm" in name:
            kind, scale = "ones", 1.0
        elif last == "bias":
            kind, scale = "bias", 1.0
        else:
            kind, scale = "matrix", 1.0 if "embed" in name else leaf.shape[0] ** -0.5
        out.append(_maker(tuple(leaf.shape), leaf_dtype, kind, scale, sharding)(key))
    state = jax.tree_util.tree_unflatten(treedef, out)
    jax.block_until_ready(out)
    num_bytes = sum(x.size * x.dtype.itemsize for x in out)
    return LoadedModel(cfg, graphdef, state, time.perf_counter() - t0, num_bytes)
