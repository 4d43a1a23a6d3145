"""PartitionSpecs of weights and KV pages, and the mesh."""

import pytest
from jax.sharding import PartitionSpec as P

from jaxdyn.parallel.sharding import (kv_cache_partition_spec, make_mesh, param_partition_spec,
                                      stored_kv_heads)


@pytest.mark.parametrize("path,shape,spec", [
    (("layers", 0, "self_attn", "q_proj", "kernel", "value"), (64, 64), P(None, "model")),
    (("layers", 0, "self_attn", "k_proj", "bias", "value"), (32,), P("model")),
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
