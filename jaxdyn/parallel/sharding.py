"""Meshes with named axes and the PartitionSpec of every weight and of the KV cache.

Tensor parallelism (Megatron style) over the mesh axis ``"model"``:
attention is split by heads (the merged q/k/v column-parallel, o row-parallel), the MLP
by its width (gate/up column-parallel, down row-parallel), embeddings and the
LM head by vocabulary, the KV cache by kv heads. The ``"data"`` axis is
reserved for data parallelism and has size 1 for now.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Per parameter leaf name: the spec of a 2-D kernel / 1-D bias or table.
_COLUMN = (None, MODEL_AXIS)      # output features split
_ROW = (MODEL_AXIS, None)         # input features split
_RULES: dict[tuple[str, str], tuple] = {
    # q, k and v as one kernel whose columns hold each shard's heads in turn (``llama.merge_qkv``)
    ("qkv_proj", "kernel"): _COLUMN, ("qkv_proj", "bias"): (MODEL_AXIS,),
    ("o_proj", "kernel"): _ROW, ("o_proj", "bias"): (None,),
    ("gate_proj", "kernel"): _COLUMN, ("gate_proj", "bias"): (MODEL_AXIS,),
    ("up_proj", "kernel"): _COLUMN, ("up_proj", "bias"): (MODEL_AXIS,),
    ("down_proj", "kernel"): _ROW, ("down_proj", "bias"): (None,),
    # fp8 weights are [out, in] (``llama.Linear``): qkv, gate and up split their output features (axis 0
    # here), o and down their input features (axis 1)
    ("qkv_proj", "weight"): _ROW, ("o_proj", "weight"): _COLUMN,
    ("gate_proj", "weight"): _ROW, ("up_proj", "weight"): _ROW,
    ("down_proj", "weight"): _COLUMN,
    # per-output-channel scales of int8/fp8 kernels follow the output split
    ("qkv_proj", "scale"): (MODEL_AXIS,), ("o_proj", "scale"): (None,),
    ("gate_proj", "scale"): (MODEL_AXIS,), ("up_proj", "scale"): (MODEL_AXIS,),
    ("down_proj", "scale"): (None,),
    ("embed_tokens", "embedding"): _ROW,      # [vocab, hidden]: vocab split
    ("lm_head", "kernel"): _COLUMN,           # [hidden, vocab]: vocab split
    ("lm_head", "weight"): _ROW, ("lm_head", "scale"): (MODEL_AXIS,),    # fp8 [vocab, hidden]: vocab split
}


def make_mesh(tensor_parallel: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh of ``tensor_parallel`` devices along "model"."""
    devices = list(devices) if devices is not None else jax.devices()
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
    if len(devices) < tensor_parallel:
        raise ValueError(
            f"tensor_parallel={tensor_parallel} needs {tensor_parallel} devices, "
            f"{len(devices)} available")
    grid = np.array(devices[:tensor_parallel], dtype=object).reshape(1, tensor_parallel)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def model_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[MODEL_AXIS]


def stored_kv_heads(num_kv_heads: int, tensor_parallel: int) -> int:
    """KV heads held in the cache: replicated up to the TP degree when there are fewer.

    With fewer kv heads than shards (MQA, or GQA at high TP) each shard keeps a
    copy of the one kv head its query heads read, as vLLM does.
    """
    if num_kv_heads >= tensor_parallel:
        if num_kv_heads % tensor_parallel:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} is not divisible by tensor_parallel={tensor_parallel}")
        return num_kv_heads
    if tensor_parallel % num_kv_heads:
        raise ValueError(
            f"tensor_parallel={tensor_parallel} is not a multiple of num_kv_heads={num_kv_heads}")
    return tensor_parallel


def _fit(spec: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop the split on any axis the mesh does not divide evenly (it stays replicated)."""
    fitted = []
    for axis_name, dim in zip(spec, shape):
        if axis_name is not None and dim % mesh.shape[axis_name]:
            axis_name = None
        fitted.append(axis_name)
    return P(*fitted)


def param_partition_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec of the parameter at ``path`` (module names ending in the leaf name)."""
    names = [p for p in path if isinstance(p, str)]
    if names and names[-1] == "value":        # nnx.Variable's own attribute
        names = names[:-1]
    if len(names) >= 2:
        rule = _RULES.get((names[-2], names[-1]))
        if rule is not None:
            return _fit(rule, shape, mesh)
    return P(*([None] * len(shape)))          # norms and anything unnamed: replicated


def param_shardings(state, mesh: Mesh):
    """A pytree of NamedShardings matching an (abstract) parameter state."""

    def one(path, leaf):
        keys = tuple(_key_name(k) for k in path)
        return NamedSharding(mesh, param_partition_spec(keys, leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, state)


def kv_cache_partition_spec(mesh: Mesh, num_kv_heads: int) -> P:
    """KV pages [num_kv_heads, num_pages, page_size, head_dim] split over kv heads."""
    return _fit((MODEL_AXIS, None, None, None), (num_kv_heads, 1, 1, 1), mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _key_name(key) -> str | int:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)
