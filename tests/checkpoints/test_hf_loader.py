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
from tests.support import make_byte_tokenizer, make_hf_checkpoint


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


def test_a_weight_that_is_not_floats_is_refused(llama_dir, tmp_path):
    """An 8-bit or integer weight (a quantized checkpoint without its config) was cast to floats and served as its
    raw values: refused, naming the file, the tensor and its dtype, by the loader and by convert."""
    from checkpoints.convert import convert
    path = _copy(llama_dir, tmp_path / "int8")

    def edit(h):                                    # its expected shape, (64,), in int8s: the first 64 bytes
        entry = h["model.norm.weight"]
        begin, _ = entry["data_offsets"]
        entry.update(dtype="I8", data_offsets=[begin, begin + 64])
        return h

    _rewrite_safetensors(path, edit)
    words = r"model\.safetensors: tensor 'model\.norm\.weight' is I8, not a float weight"
    with pytest.raises(CheckpointError, match=words):
        load_hf_checkpoint(path, make_mesh(1))
    from tests.support import make_byte_tokenizer
    make_byte_tokenizer(str(path))                  # convert wants a servable checkpoint: a tokenizer beside it
    with pytest.raises(CheckpointError, match=words):
        convert(str(path), str(tmp_path / "out"))


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


def _with_tensors(src, dst, extra: dict, fname="model.safetensors"):
    """A copy of the single-file checkpoint ``src`` with ``extra`` tensors written into ``fname`` (the whole
    checkpoint's tensors too when ``fname`` is model.safetensors, else ``extra`` alone)."""
    from checkpoints.safetensors_io import CheckpointFiles, save_safetensors
    path = _copy(src, dst)
    if fname == "model.safetensors":
        files = CheckpointFiles(path)
        tensors = {n: np.array(files.get(n)) for n in files.where}
        save_safetensors(os.path.join(path, fname), {**tensors, **extra})
    else:
        save_safetensors(os.path.join(path, fname), extra)
    return path


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return make_hf_checkpoint("llama3.2-tied", str(tmp_path_factory.mktemp("tied")))


@pytest.mark.parametrize("head", ["distinct", "the_embedding"])
def test_a_tied_config_with_its_own_lm_head_uses_it_as_transformers_5_does(tied_dir, tmp_path, head, caplog):
    """tie_word_embeddings set, and the checkpoint also holds an lm_head.weight: transformers 5 uses that head
    when it differs from the embedding (and warns); it had been skipped for the embedding, silently wrong logits.
    An identical copy keeps the model tied. The same holds for what `jaxdyn convert` writes."""
    from checkpoints.convert import convert
    from checkpoints.loader import plan_model
    from tests.support import hf_model
    emb = np.array(load_hf_checkpoint(tied_dir, make_mesh(1)).state["embed_tokens"]["embedding"][...])
    given = np.random.default_rng(0).standard_normal(emb.shape).astype(np.float32) if head == "distinct" else emb
    path = _with_tensors(tied_dir, tmp_path / "ckpt", {"lm_head.weight": given})
    with caplog.at_level("WARNING", logger="jaxdyn.checkpoints"):
        plan = plan_model(path)
    assert plan.config.tie_word_embeddings == (head == "the_embedding")
    assert ("lm_head.weight differs from the embedding" in caplog.text) == (head == "distinct")
    want = hf_model(path).lm_head.weight.detach().numpy()          # what transformers computes with
    np.testing.assert_array_equal(want, given)
    for loaded in (load_hf_checkpoint(path, make_mesh(1)), load_hf_checkpoint(path, make_mesh(1), config=plan.config)):
        state = loaded.state
        used = np.array(state["embed_tokens"]["embedding"][...]) if loaded.config.tie_word_embeddings else \
            np.array(state["lm_head"]["kernel"][...]).T
        np.testing.assert_array_equal(used, given)
    out = tmp_path / "converted"
    make_byte_tokenizer(path)
    convert(path, str(out), dtype="float32", progress=False)
    assert json.load(open(out / "config.json"))["tie_word_embeddings"] == (head == "the_embedding")


def test_without_an_index_only_model_safetensors_is_read_and_a_tensor_in_two_files_is_refused(llama_dir, tmp_path):
    """A copy of a tensor beside model.safetensors (a backup, an adapter) is not read, as transformers reads only
    model.safetensors without an index; it had silently replaced the model's. Several files without
    model.safetensors or an index that repeat a tensor: refused, naming both files."""
    from checkpoints.safetensors_io import CheckpointFiles
    norm = np.array(CheckpointFiles(llama_dir).get("model.norm.weight"))
    path = _with_tensors(llama_dir, tmp_path / "backup", {"model.norm.weight": norm * 0 + 7},
                         fname="model_backup.safetensors")
    loaded = load_hf_checkpoint(path, make_mesh(1))
    np.testing.assert_array_equal(np.array(loaded.state["norm"]["weight"][...]), norm)
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "model-a.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is in both model-a\.safetensors and "
                                              r"model_backup\.safetensors"):
        load_hf_checkpoint(path, make_mesh(1))
