"""Load a Hugging Face checkpoint directory tensor by tensor into a sharded jaxdyn model.

Each parameter is read from its memory-mapped safetensors file, transposed
(HF ``Linear.weight`` is ``[out, in]``; jaxdyn kernels are ``[in, out]``), cast,
and placed with ``jax.make_array_from_callback`` so every device receives only
its own shard; the whole model is never held in host memory at once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from checkpoints.safetensors_io import CheckpointFiles, SafetensorsError
from jaxdyn.config import ModelConfig, hub_id_hint
from jaxdyn.models.llama import is_quantized, merge_qkv
from jaxdyn.models.registry import build_abstract_model
from jaxdyn.parallel.sharding import model_parallel_size, param_shardings

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
    """jaxdyn parameter path -> Hugging Face tensor name (of a parameter that is one HF tensor)."""
    parts = [str(p) for p in path if p != "value"]
    leaf = parts[-1]
    if leaf in ("kernel", "embedding"):
        parts[-1] = "weight"
    name = ".".join(parts)
    return name if parts[0] == "lm_head" else "model." + name


QKV_PARTS = ("q_proj", "k_proj", "v_proj")


def hf_names(path: tuple, cfg: ModelConfig | None = None) -> list[str]:
    """jaxdyn parameter path -> the Hugging Face tensors it is made of: ``qkv_proj``'s are q, k and v's; the fp8
    lm_head of a model with tied embeddings (``cfg.quantize_lm_head``) is the embedding's."""
    keys = [p for p in path if p != "value"]
    if keys[0] == "lm_head" and cfg is not None and cfg.tie_word_embeddings:
        return ["model.embed_tokens.weight"]
    if len(keys) >= 2 and keys[-2] == "qkv_proj":
        return [hf_name((*keys[:-2], part, keys[-1])) for part in QKV_PARTS]
    return [hf_name(tuple(keys))]


def qkv_sizes(cfg: ModelConfig) -> tuple[int, int]:
    """Output features of q and of each of k, v, as Hugging Face holds them."""
    return cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim


def _replicate_kv(array: np.ndarray, cfg: ModelConfig, stored: int) -> np.ndarray:
    """k or v features [..., num_kv_heads * head_dim] -> [..., stored * head_dim], each head repeated."""
    if stored == cfg.num_kv_heads:
        return array
    heads = array.reshape(*array.shape[:-1], cfg.num_kv_heads, cfg.head_dim)
    return np.repeat(heads, stored // cfg.num_kv_heads, axis=-2).reshape(*array.shape[:-1], stored * cfg.head_dim)


log = logging.getLogger("jaxdyn.checkpoints")


def untie_a_distinct_head(cfg: ModelConfig, files: CheckpointFiles, where: str) -> ModelConfig:
    """``cfg`` untied when it ties the embeddings but the checkpoint holds an ``lm_head.weight`` that differs
    from the embedding: transformers 5 then uses the head (with a warning), not the embedding. An identical head
    changes nothing."""
    if not (cfg.tie_word_embeddings and "lm_head.weight" in files and "model.embed_tokens.weight" in files):
        return cfg
    head, emb = files.get("lm_head.weight"), files.get("model.embed_tokens.weight")
    if head.shape == emb.shape:
        if head.dtype == emb.dtype:
            same = np.array_equal(head.reshape(-1).view(np.uint8), emb.reshape(-1).view(np.uint8))
        else:
            same = np.array_equal(head.astype(np.float32), emb.astype(np.float32))
        if same:
            return cfg
    log.warning("%s: tie_word_embeddings is set, but lm_head.weight differs from the embedding: lm_head.weight "
                "is used (as transformers 5 does)", where)
    return dataclasses.replace(cfg, tie_word_embeddings=False)


def load_hf_checkpoint(path: str | os.PathLike, mesh: Mesh, *, dtype=None,
                       config: ModelConfig | None = None, abstract=None) -> LoadedModel:
    """Read ``path`` (config.json + safetensors) into a model sharded over ``mesh``.
    ``abstract``: ``build_abstract_model(cfg, mesh, dtype)`` when the caller has built it already."""
    t0 = time.perf_counter()
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory{hub_id_hint(path)}")
    cfg = config or ModelConfig.from_pretrained(path)
    dtype = jnp.dtype(dtype or cfg.dtype)
    try:
        files = CheckpointFiles(path)
        if config is None:
            cfg = untie_a_distinct_head(cfg, files, path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e

    graphdef, abstract = abstract or build_abstract_model(cfg, mesh, dtype)
    shardings = param_shardings(abstract, mesh)
    expected = set()

    tp = model_parallel_size(mesh)
    # Quantized on the device as they load (``cfg.quantization``: the checkpoint holds the model's float weights):
    # each quantized Linear's scale is made with its weight and put in place after.
    sharding_of = {_path_keys(p): sh for p, sh in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    scales: dict[tuple, jax.Array] = {}

    def load_one(key_path, leaf, sharding):
        keys = _path_keys(key_path)
        if keys[-1] == "scale":             # a quantized Linear's: made with its weight, below
            return leaf
        quantized = is_quantized(leaf.dtype, cfg.quantization)
        names = hf_names(keys, cfg)
        expected.update(names)
        kernel = keys[-1] == "kernel"
        arrays = []
        for name, want in zip(names, _hf_shapes(keys, leaf.shape, cfg)):
            if name not in files:
                raise CheckpointError(
                    f"{path}: missing tensor {name!r} (looked in {sorted(set(files.where.values()))})")
            try:
                raw = files.get(name)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from e
            if tuple(raw.shape) != want:
                raise CheckpointError(
                    f"{files.file_of(name)}: tensor {name!r} has shape {tuple(raw.shape)}, "
                    f"expected {want} for this config")
            try:
                files.check_float(name)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
            arrays.append(raw.T if kernel else raw)
        if len(arrays) == 1:
            array = arrays[0]
        elif keys[-1] == "weight":          # an fp8 weight is [out, in]: q, k and v merged as [in, out]
            array = _merged_qkv([a.T for a in arrays], cfg, leaf.shape[::-1], tp).T
        else:
            array = _merged_qkv(arrays, cfg, leaf.shape, tp)
        if not quantized:
            return jax.make_array_from_callback(
                leaf.shape, sharding, lambda idx: np.asarray(array[idx]).astype(dtype))
        # sent in the file's float type (bf16 -> f32 is exact: made float32 on the device, half the bytes moved)
        src = np.dtype(array.dtype) if np.dtype(array.dtype) in _EXACT_IN_F32 else np.dtype(np.float32)
        full = jax.make_array_from_callback(leaf.shape, sharding, lambda idx: np.asarray(array[idx]).astype(src))
        axis = 1 if keys[-1] == "weight" else 0        # over the input features: a scale per output channel
        q, scales[keys[:-1]] = _quantizer(cfg.quantization, axis, sharding,
                                          sharding_of[keys[:-1] + ("scale",)])(full)
        return q

    state = jax.tree_util.tree_map_with_path(load_one, abstract, shardings)
    if scales:
        state = jax.tree_util.tree_map_with_path(
            lambda p, x: scales[_path_keys(p)[:-1]] if isinstance(x, jax.ShapeDtypeStruct) else x, state)
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


# Float types a weight may be sent to the devices in and made float32 there without rounding
_EXACT_IN_F32 = (np.dtype(jnp.bfloat16), np.dtype(np.float16), np.dtype(np.float32))


@functools.lru_cache(maxsize=None)
def _quantizer(kind: str, axis: int, sharding, scale_sharding):
    """float weights -> (quantized weights, float32 scale per output channel): ``convert.quantize`` on the
    devices (an 8B model takes about a minute of numpy on the host)."""
    from checkpoints.convert import quantize     # convert imports this module
    return jax.jit(lambda w: quantize(w, kind, axis, xp=jnp), out_shardings=(sharding, scale_sharding))


def _path_keys(key_path) -> tuple:
    return tuple(_key(k) for k in key_path if _key(k) != "value")


def _key(k):
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _merged_qkv(arrays: list, cfg: ModelConfig, target: tuple, tp: int) -> np.ndarray:
    """q, k, v ([in, out] kernels or [out] vectors, Hugging Face's heads) -> ``qkv_proj``'s columns for ``tp``
    shards, kv heads replicated where the cache stores more than the model has."""
    q_size, _ = qkv_sizes(cfg)
    stored = (target[-1] - q_size) // (2 * cfg.head_dim)
    q, k, v = (np.asarray(a) for a in arrays)
    return merge_qkv(q, _replicate_kv(k, cfg, stored), _replicate_kv(v, cfg, stored), tp)


def _hf_shapes(keys: tuple, shape: tuple, cfg: ModelConfig) -> list[tuple]:
    """The Hugging Face shapes of the tensors a parameter of ``shape`` is made of (``hf_names``' order)."""
    keys = [k for k in keys if k != "value"]
    leaf = keys[-1]
    if keys[-2] == "qkv_proj":
        q_size, kv_size = qkv_sizes(cfg)
        if leaf == "weight":          # an fp8 weight: [out, in], as Hugging Face holds it
            return [(n, *shape[1:]) for n in (q_size, kv_size, kv_size)]
        shapes = [(*shape[:-1], n) for n in (q_size, kv_size, kv_size)]
    else:
        shapes = [tuple(shape)]
    return [tuple(reversed(s)) if leaf == "kernel" else tuple(s) for s in shapes]
