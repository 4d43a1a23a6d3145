"""PartitionSpecs of weights and KV pages, and the mesh."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdyn.parallel.sharding import (kv_cache_partition_spec, make_mesh, param_partition_spec,
                                      stored_kv_heads)


@pytest.mark.parametrize("path,shape,spec", [
    (("layers", 0, "self_attn", "qkv_proj", "kernel", "value"), (64, 128), P(None, "model")),
    (("layers", 0, "self_attn", "qkv_proj", "bias", "value"), (128,), P("model")),
    (("layers", 0, "self_attn", "o_proj", "kernel", "value"), (64, 64), P("model", None)),
    (("layers", 1, "mlp", "gate_proj", "kernel", "value"), (64, 128), P(None, "model")),
    (("layers", 1, "mlp", "down_proj", "kernel", "value"), (128, 64), P("model", None)),
    (("embed_tokens", "embedding", "value"), (256, 64), P("model", None)),
    (("lm_head", "kernel", "value"), (64, 256), P(None, "model")),
    (("layers", 0, "input_layernorm", "weight", "value"), (64,), P(None)),
    (("lm_head", "kernel", "value"), (64, 255), P(None, None)),   # vocab not divisible: replicated
])
def test_weight_specs_split_heads_mlp_width_and_vocab(path, shape, spec):
    assert param_partition_spec(path, shape, make_mesh(2)) == spec


def test_kv_pages_split_over_kv_heads():
    assert kv_cache_partition_spec(make_mesh(4), 4) == P("model", None, None, None)
    assert kv_cache_partition_spec(make_mesh(1), 2) == P("model", None, None, None)


def test_kv_heads_replicate_up_to_the_tp_degree():
    assert stored_kv_heads(8, 2) == 8
    assert stored_kv_heads(1, 4) == 4
    assert stored_kv_heads(2, 4) == 4
    with pytest.raises(ValueError, match="not divisible"):
        stored_kv_heads(6, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        stored_kv_heads(3, 4)


def test_mesh_needs_enough_devices():
    mesh = make_mesh(4)
    assert mesh.shape == {"data": 1, "model": 4}
    with pytest.raises(ValueError, match="needs 64 devices"):
        make_mesh(64)


def test_merged_qkv_gives_each_column_shard_its_own_heads_and_splits_back():
    from jaxdyn.models.llama import merge_qkv, split_qkv
    d, hd, nq, nkv, tp = 3, 2, 4, 2, 2
    q = np.arange(d * nq * hd).reshape(d, nq * hd)
    k = 1000 + np.arange(d * nkv * hd).reshape(d, nkv * hd)
    v = 2000 + np.arange(d * nkv * hd).reshape(d, nkv * hd)
    m = merge_qkv(q, k, v, tp)
    assert m.shape == (d, (nq + 2 * nkv) * hd)
    half = m.shape[1] // tp
    # shard 0: q heads 0-1, k head 0, v head 0; shard 1: q heads 2-3, k head 1, v head 1
    np.testing.assert_array_equal(m[:, :half], np.concatenate([q[:, :4], k[:, :2], v[:, :2]], axis=1))
    np.testing.assert_array_equal(m[:, half:], np.concatenate([q[:, 4:], k[:, 2:], v[:, 2:]], axis=1))
    for got, want in zip(split_qkv(m, nq * hd, nkv * hd, tp), (q, k, v)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(merge_qkv(q[0], k[0], v[0], 1), np.concatenate([q[0], k[0], v[0]]))
