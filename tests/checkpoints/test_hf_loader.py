"""Loading Hugging Face safetensors directories into sharded parameters, and the errors on bad ones."""

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from checkpoints.hf import CheckpointError, load_hf_checkpoint
from jaxdyn.config import ConfigError
from jaxdyn.parallel.sharding import make_mesh
from tests.support import make_hf_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_hf_checkpoint("llama3.1", str(tmp_path_factory.mktemp("llama")))


def _leaves(loaded):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(loaded.state)}


def test_sharded_index_checkpoint_loads_the_same_tensors(llama_dir, tmp_path):
    sharded = make_hf_checkpoint("llama3.1", str(tmp_path / "sharded"), max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    mesh = make_mesh(1)
    a = _leaves(load_hf_checkpoint(llama_dir, mesh, dtype=jnp.float32))
    b = _leaves(load_hf_checkpoint(sharded, mesh, dtype=jnp.float32))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_bfloat16_checkpoint_loads_in_its_own_dtype(tmp_path):
    path = make_hf_checkpoint("qwen2", str(tmp_path / "bf16"), dtype="bfloat16")
    loaded = load_hf_checkpoint(path, make_mesh(1))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded.state))
    assert loaded.num_bytes == sum(x.size * 2 for x in jax.tree.leaves(loaded.state))


def test_tensor_parallel_load_places_each_weight_on_its_shards(llama_dir):
    mesh = make_mesh(2)
    loaded = load_hf_checkpoint(llama_dir, mesh, dtype=jnp.float32)
    attn = loaded.state["layers"][0]["self_attn"]
    mlp = loaded.state["layers"][0]["mlp"]
    assert attn["qkv_proj"]["kernel"][...].sharding.spec == P(None, "model")
    assert attn["o_proj"]["kernel"][...].sharding.spec == P("model", None)
    assert mlp["down_proj"]["kernel"][...].sharding.spec == P("model", None)
    q = attn["qkv_proj"]["kernel"][...]
    shard_shapes = {s.data.shape for s in q.addressable_shards}
    assert shard_shapes == {(q.shape[0], q.shape[1] // 2)}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_safetensors(path, edit):
    """Apply ``edit(header) -> header`` to a single-file checkpoint, keeping the data."""
    fname = os.path.join(path, "model.safetensors")
    with open(fname, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header = edit(header)
    raw = json.dumps(header).encode()
    with open(fname, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def test_missing_tensor_is_named(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "missing")
    _rewrite_safetensors(path, lambda h: {k: v for k, v in h.items()
                                          if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_hf_checkpoint(path, make_mesh(1))


@pytest.mark.parametrize("where", ["--engine-process", "--no-engine-process"])
def test_a_server_whose_checkpoint_fails_to_load_while_its_steps_compile_exits_2_naming_it(
        llama_dir, tmp_path, where):
    """The config is fine, so the steps start compiling while the weights load; the load then fails. The
    server says why and exits 2 (a process that exited while XLA compiled on another thread aborted)."""
    import subprocess
    import sys
    path = _copy(llama_dir, tmp_path / "missing")
    _rewrite_safetensors(path, lambda h: {k: v for k, v in h.items()
                                          if k != "model.layers.1.mlp.up_proj.weight"})
    argv = [sys.executable, "-m", "serving.cli", "serve", "--model", path, "--port", "0", "--max-model-len", "64",
            "--max-num-seqs", "2", "--max-num-batched-tokens", "16", "--num-pages", "16", "--log-level", "warning"]
    if where == "--no-engine-process":
        argv.append(where)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=root,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert p.returncode == 2, p.stdout + p.stderr
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in p.stderr
    assert "Traceback" not in p.stderr and "FATAL" not in p.stderr


def test_wrong_shape_names_file_and_tensor(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "shape")


    def edit(h):
        entry = h["model.norm.weight"]
        begin, end = entry["data_offsets"]
        entry["shape"] = [entry["shape"][0] // 2]
        entry["data_offsets"] = [begin, begin + (end - begin) // 2]
        return h

    _rewrite_safetensors(path, edit)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \(32,\), expected \(64,\)"):
        load_hf_checkpoint(path, make_mesh(1))


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "extra")

    def add(h):
        h["model.layers.0.self_attn.extra.weight"] = dict(h["model.norm.weight"])
        return h

    _rewrite_safetensors(path, add)
    with pytest.raises(CheckpointError, match=r"does not use: 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_hf_checkpoint(path, make_mesh(1))


def test_unsupported_architecture_is_named(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "arch")
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["FalconForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match="unsupported architecture.*FalconForCausalLM"):
        load_hf_checkpoint(path, make_mesh(1))


def test_directory_without_weights_is_named(llama_dir, tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    shutil.copy(os.path.join(llama_dir, "config.json"), path)
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_hf_checkpoint(path, make_mesh(1))
