"""Load a Hugging Face checkpoint directory tensor by tensor into a sharded jaxdyn model.

Each parameter is read from its memory-mapped safetensors file, transposed
(HF ``Linear.weight`` is ``[out, in]``; jaxdyn kernels are ``[in, out]``), cast,
and placed with ``jax.make_array_from_callback`` so every device receives only
its own shard; the whole model is never held in host memory at once.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from checkpoints.safetensors_io import CheckpointFiles, SafetensorsError
from jaxdyn.config import ModelConfig
from jaxdyn.models.registry import build_abstract_model
from jaxdyn.parallel.sharding import param_shardings

# Tensors some checkpoints carry that hold nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    graphdef: nnx.GraphDef
    state: nnx.State            # sharded parameters
    load_seconds: float
    num_bytes: int

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state)


def hf_name(path: tuple) -> str:
    """jaxdyn parameter path -> Hugging Face tensor name."""
    parts = [str(p) for p in path if p != "value"]
    leaf = parts[-1]
    if leaf in ("kernel", "embedding"):
        parts[-1] = "weight"
    name = ".".join(parts)
    return name if parts[0] == "lm_head" else "model." + name


def load_hf_checkpoint(path: str | os.PathLike, mesh: Mesh, *, dtype=None,
                       config: ModelConfig | None = None) -> LoadedModel:
    """Read ``path`` (config.json + safetensors) into a model sharded over ``mesh``."""
    t0 = time.perf_counter()
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    cfg = config or ModelConfig.from_pretrained(path)
    dtype = jnp.dtype(dtype or cfg.dtype)
    try:
        files = CheckpointFiles(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e

    graphdef, abstract = build_abstract_model(cfg, mesh, dtype)
    shardings = param_shardings(abstract, mesh)
    expected = set()

    def load_one(key_path, leaf, sharding):
        keys = tuple(_key(k) for k in key_path)
        name = hf_name(keys)
        expected.add(name)
        if name not in files:
            raise CheckpointError(f"{path}: missing tensor {name!r} (looked in {sorted(set(files.where.values()))})")
        try:
            raw = files.get(name)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from e
        array = _to_jaxdyn_layout(raw, keys, cfg, leaf.shape)
        if array.shape != leaf.shape:
            raise CheckpointError(
                f"{files.file_of(name)}: tensor {name!r} has shape {tuple(raw.shape)}, "
                f"expected {_hf_shape(keys, leaf.shape)} for this config")
        return jax.make_array_from_callback(
            leaf.shape, sharding, lambda idx: np.asarray(array[idx]).astype(dtype))

    state = jax.tree_util.tree_map_with_path(load_one, abstract, shardings)
    unexpected = [n for n in files.where if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                  and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if unexpected:
        raise CheckpointError(
            f"{path}: tensors the {cfg.architecture} config does not use: "
            f"{', '.join(repr(n) + ' in ' + files.where[n] for n in sorted(unexpected)[:5])}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    jax.block_until_ready(jax.tree.leaves(state))
    num_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return LoadedModel(cfg, graphdef, state, time.perf_counter() - t0, num_bytes)


def _key(k):
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _to_jaxdyn_layout(raw: np.ndarray, keys: tuple, cfg: ModelConfig, target: tuple) -> np.ndarray:
    """Transpose kernels and replicate kv heads when the cache stores more than the model has."""
    leaf = [k for k in keys if k != "value"][-1]
    array = raw.T if leaf == "kernel" else raw
    module = [k for k in keys if k != "value"][-2]
    if module in ("k_proj", "v_proj") and array.shape[-1] != target[-1]:
        stored = target[-1] // cfg.head_dim
        if (array.shape[-1] == cfg.num_kv_heads * cfg.head_dim
                and stored % cfg.num_kv_heads == 0):
            reps = stored // cfg.num_kv_heads
            heads = array.reshape(*array.shape[:-1], cfg.num_kv_heads, cfg.head_dim)
            array = np.repeat(heads, reps, axis=-2).reshape(*array.shape[:-1], stored * cfg.head_dim)
    return array


def _hf_shape(keys: tuple, shape: tuple) -> tuple:
    leaf = [k for k in keys if k != "value"][-1]
    return tuple(reversed(shape)) if leaf == "kernel" else tuple(shape)
