"""Random weights in the real shapes, generated on the devices in their target sharding."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from checkpoints.hf import LoadedModel
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
        if kind == "bias":
            return 0.02 * jax.random.normal(key, shape, dtype)
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.jit(make, out_shardings=sharding)


def init_dummy_weights(cfg: ModelConfig, mesh, *, dtype=None, seed: int = 0, abstract=None) -> LoadedModel:
    """Norms at 1, biases small, matrices N(0, 1/fan_in): activations stay finite at any depth.
    ``abstract``: ``build_abstract_model(cfg, mesh, dtype)`` when the caller has built it already."""
    t0 = time.perf_counter()
    dtype = jnp.dtype(dtype or cfg.dtype)
    graphdef, abstract = abstract or build_abstract_model(cfg, mesh, dtype)
    shardings = param_shardings(abstract, mesh)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    flat_shardings = jax.tree.leaves(shardings)
    out = []
    for i, ((path, leaf), sharding) in enumerate(zip(leaves, flat_shardings)):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        key = jax.random.fold_in(jax.random.key(seed), i)
        if "norm" in name:
            kind, scale = "ones", 1.0
        elif name.endswith("bias") or name.endswith("bias/value"):
            kind, scale = "bias", 1.0
        else:
            kind, scale = "matrix", 1.0 if "embed" in name else leaf.shape[0] ** -0.5
        out.append(_maker(tuple(leaf.shape), dtype, kind, scale, sharding)(key))
    state = jax.tree_util.tree_unflatten(treedef, out)
    jax.block_until_ready(out)
    num_bytes = sum(x.size * x.dtype.itemsize for x in out)
    return LoadedModel(cfg, graphdef, state, time.perf_counter() - t0, num_bytes)
