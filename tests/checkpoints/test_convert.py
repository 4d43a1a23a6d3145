"""jaxdyn convert: HF -> Orbax round trip at TP 1/2, atomic output, clear errors, int8/fp8 weights."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.convert import convert, is_converted, load_converted, quantize
from checkpoints.hf import CheckpointError, load_hf_checkpoint
from jaxdyn.engine.runner import ModelRunner, RunnerConfig, SequenceWork
from jaxdyn.parallel.sharding import make_mesh
from serving.cli import main
from tests.support import make_byte_tokenizer, make_hf_checkpoint


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = make_hf_checkpoint("llama-mqa-bias", str(tmp_path_factory.mktemp("hf")), max_shard_size="100KB")
    make_byte_tokenizer(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [257, 3]}, f)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))     # sharded
    return path


def logits_of(loaded, mesh, **runner):
    r = ModelRunner(loaded.graphdef, loaded.state, mesh, RunnerConfig(
        num_pages=8, max_num_batched_tokens=16, max_num_seqs=1, max_model_len=64, return_logits=True, **runner))
    return r.step([SequenceWork([256, 5, 6, 7, 8, 9], 0, [0])]).logits[0]


@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_equals_loading_hf_directly(hf, tmp_path, tp):
    out = str(tmp_path / "conv")
    assert main(["convert", "--hf", hf, "--out", out, "--dtype", "float32", "--quiet"]) == 0
    assert is_converted(out)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == [257, 3]
    mesh = make_mesh(tp)
    a = load_converted(out, mesh)
    b = load_hf_checkpoint(hf, mesh, dtype=jnp.float32)
    assert a.num_bytes == b.num_bytes and a.load_seconds > 0
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        assert x.sharding == y.sharding and np.array_equal(np.asarray(x), np.asarray(y))
    assert np.array_equal(logits_of(a, mesh), logits_of(b, mesh))


def test_errors_name_the_problem(hf, tmp_path, capsys):
    def fails(argv, message):
        assert main(["convert", "--quiet", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err, err

    out = str(tmp_path / "o")
    os.makedirs(out)
    fails(["--hf", hf, "--out", out], "already exists (pass --force")
    fails(["--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "not a directory")
    # a Hub id is not downloaded: the message says so; a PyTorch-only directory is named as such
    fails(["--hf", "no-such-org/no-such-model", "--out", str(tmp_path / "x")],
          "a Hugging Face Hub id? jaxdyn reads local directories only")
    torch_only = tmp_path / "torch_only"
    torch_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf, name), torch_only / name)
    (torch_only / "pytorch_model.bin").write_bytes(b"x")
    fails(["--hf", str(torch_only), "--out", str(tmp_path / "x")], "found pytorch_model.bin: PyTorch checkpoints")
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    fails(["--hf", str(bad), "--out", str(tmp_path / "x")], "GPT2LMHeadModel")
    notok = tmp_path / "notok"
    shutil.copytree(hf, notok)
    os.remove(notok / "tokenizer.json")
    fails(["--hf", str(notok), "--out", str(tmp_path / "x")], "missing tokenizer")
    badtok = tmp_path / "badtok"        # copied as it is, it would fail only when served
    shutil.copytree(hf, badtok)
    (badtok / "tokenizer_config.json").write_text('{"chat_template": [1, "x"]}')
    fails(["--hf", str(badtok), "--out", str(tmp_path / "x")], "tokenizer_config.json: chat_template must be")
    # a tensor missing, an extra one, a wrong shape: edit the index to point elsewhere
    from safetensors.numpy import load_file, save_file
    for case, message in [("missing", "missing tensor 'model.layers.0.mlp.up_proj.weight'"),
                          ("extra", "does not use: 'model.layers.0.surprise.weight'"),
                          ("shape", "'model.norm.weight' has shape (3,)"),
                          ("elsewhere", "no tensor 'model.layers.0.mlp.up_proj.weight'")]:
        d = tmp_path / case
        shutil.copytree(hf, d)
        idx = json.load(open(d / "model.safetensors.index.json"))
        name = {"missing": "model.layers.0.mlp.up_proj.weight", "extra": None, "shape": "model.norm.weight",
                "elsewhere": "model.layers.0.mlp.up_proj.weight"}[case]
        if case == "missing":
            del idx["weight_map"][name]
        elif case == "elsewhere":       # the index names a shard that does not hold it
            idx["weight_map"][name] = next(f for f in sorted(set(idx["weight_map"].values()))
                                           if f != idx["weight_map"][name])
        else:
            extra = {"model.layers.0.surprise.weight": np.zeros(2, np.float32)} if case == "extra" else \
                {"model.norm.weight": np.zeros(3, np.float32)}
            save_file(extra, str(d / "patch.safetensors"))
            for k in extra:
                idx["weight_map"][k] = "patch.safetensors"
        json.dump(idx, open(d / "model.safetensors.index.json", "w"))
        fails(["--hf", str(d), "--out", str(tmp_path / f"x{case}")], message)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("x") or ".partial" in p]


def test_force_never_replaces_what_is_not_a_jaxdyn_checkpoint(hf, tmp_path, capsys):
    """--force replaces a converted checkpoint or an empty directory; it refuses, leaving them as they were, the
    input itself, a directory holding the input, an empty --out (the current directory), a file and a
    directory of other files. Output paths that cannot be written are named, without a traceback."""
    models = tmp_path / "models"
    src = models / "src"
    shutil.copytree(hf, src)
    keep = models / "keep"
    keep.mkdir()
    (keep / "important.txt").write_text("x")
    (tmp_path / "afile.txt").write_text("y")
    for out, message in [(str(models), "is the input checkpoint or a directory holding it"),
                         (str(src), "is the input checkpoint or a directory holding it"),
                         (str(tmp_path), "is the input checkpoint or a directory holding it"),
                         ("", "--out: an empty path"),
                         (str(keep), "is not a jaxdyn checkpoint"),
                         (str(tmp_path / "afile.txt"), "exists and is not a directory"),
                         (str(tmp_path / "afile.txt" / "x"), "afile.txt"),
                         ("/proc/jaxdyn-no-such/x", "/proc/jaxdyn-no-such")]:
        assert main(["convert", "--quiet", "--force", "--hf", str(src), "--out", out]) == 2, out
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (out, err)
    assert sorted(os.listdir(models)) == ["keep", "src"] and os.listdir(keep) == ["important.txt"]
    assert sorted(os.listdir(src)) == sorted(os.listdir(hf))
    assert (tmp_path / "afile.txt").read_text() == "y"
    empty = tmp_path / "empty"
    empty.mkdir()
    for _ in range(2):          # an empty directory, then the checkpoint written there
        assert main(["convert", "--quiet", "--force", "--hf", str(src), "--out", str(empty)]) == 0
        assert is_converted(str(empty))
    assert main(["convert", "--quiet", "--hf", str(empty), "--out", str(tmp_path / "again")]) == 2
    assert "already a converted jaxdyn checkpoint" in capsys.readouterr().err
    os.remove(empty / "jaxdyn_checkpoint.json")        # a damaged checkpoint: said so, not "no safetensors"
    with pytest.raises(CheckpointError, match="without its jaxdyn_checkpoint.json"):
        load_hf_checkpoint(str(empty), make_mesh(1))


def test_interrupted_conversion_leaves_nothing_loadable(hf, tmp_path, monkeypatch):
    import checkpoints.convert as conv
    calls = {"n": 0}
    real = conv.quantize

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "quantize", boom)
    out = tmp_path / "half"
    with pytest.raises(KeyboardInterrupt):
        convert(hf, str(out), quant="int8", progress=False)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_a_write_that_fails_is_a_cli_message(hf, tmp_path):
    """TensorStore reports a failed write (a full disk, here the process's file size limit) as a ValueError: it went
    past convert's handler as hundreds of lines of tracebacks from Orbax's threads; now one CLI message naming the
    output and the group, exit 2, nothing left behind."""
    import shlex
    import subprocess
    import sys
    out = tmp_path / "small" / "out"
    cmd = [sys.executable, "-m", "serving.cli", "convert", "--quiet", "--hf", hf, "--out", str(out), "--dtype", "float32"]
    p = subprocess.run(["bash", "-c", "ulimit -f 40 && exec " + shlex.join(cmd)], capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("W")]
    assert "Traceback" not in p.stderr and len(lines) <= 3, p.stderr[-3000:]
    assert "jaxdyn convert: error:" in p.stderr and "writing" in p.stderr and "failed" in p.stderr, p.stderr
    assert not out.exists() and os.listdir(tmp_path / "small") == []


@pytest.mark.parametrize("where", ["middle", "start"])
def test_a_damaged_checkpoint_is_named_in_a_few_lines(hf, tmp_path, where):
    """A group's data overwritten on disk (mid-file: a b-tree node's checksum fails; near the start: an array's
    compressed chunk, which Orbax wraps in "See full TensorStore details: <spec>"): CheckpointError names the group
    and TensorStore's reason, without the kilobytes of TensorStore specs its errors carry."""
    import glob
    out = str(tmp_path / "conv")
    convert(hf, out, progress=False)
    data = [f for f in glob.glob(os.path.join(out, "params", "layers.0", "**", "d", "*"), recursive=True)
            if os.path.isfile(f)]
    assert data
    if where == "start":                   # the largest file holds the arrays' chunks, the others b-tree nodes
        data = [max(data, key=os.path.getsize)]
    for f in data:
        b = bytearray(open(f, "rb").read())
        n = len(b)
        at = n // 2 if where == "middle" else 50
        b[at:at + 200] = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
        open(f, "wb").write(b[:n])
    with pytest.raises(CheckpointError) as e:
        load_converted(out, make_mesh(1))
    message = str(e.value)
    assert "cannot restore group 'layers.0'" in message and "convert it again" in message
    assert "tensorstore_spec" not in message and "TensorStore details" not in message and len(message) < 900, message
    assert re.search(r"checksum|corrupt|decompress|decod", message, re.I), message       # the reason itself


def test_force_replaces_and_quantized_restores_at_tp2(hf, tmp_path):
    out = str(tmp_path / "q")
    convert(hf, out, dtype="float32", progress=False)
    info = convert(hf, out, dtype="float32", quant="int8", force=True, progress=False)
    full = load_hf_checkpoint(hf, make_mesh(2), dtype=jnp.float32)
    q = load_converted(out, make_mesh(2))
    assert q.config.quantization == "int8"
    kern = q.state["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert kern.dtype == jnp.int8
    assert info["param_bytes"] < 0.6 * full.num_bytes
    a, b = logits_of(q, make_mesh(2)), logits_of(full, make_mesh(2))
    assert np.abs(a - b).max() / np.abs(b).max() < 0.05


@pytest.mark.parametrize("kind, tol", [("int8", 1 / 127), ("fp8", 1 / 14)])
def test_quantize_error_is_bounded_per_channel(kind, tol):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 32)).astype(np.float32) * rng.uniform(0.1, 5, 32)
    q, s = quantize(w, kind)
    err = np.abs(q.astype(np.float32) * s - w).max(axis=0) / np.abs(w).max(axis=0)
    assert (err <= tol).all()


@pytest.mark.parametrize("tp", [1, 4])
def test_fp8_checkpoint_runs_the_model_close_to_full_precision(hf, tmp_path, tp):
    out = str(tmp_path / "fp8")
    convert(hf, out, dtype="float32", quant="fp8", progress=False)
    mesh = make_mesh(tp)
    q = load_converted(out, mesh)
    assert q.config.quantization == "fp8"
    weight = q.state["layers"][0]["mlp"]["up_proj"]["weight"]
    assert weight.dtype == jnp.float8_e4m3fn and weight.shape == (q.config.intermediate_size, q.config.hidden_size)
    full = load_hf_checkpoint(hf, mesh, dtype=jnp.float32)
    a, b = logits_of(q, mesh), logits_of(full, mesh)
    err = np.abs(a - b).max() / np.abs(b).max()
    assert 0 < err < 0.15      # quantized (not equal), and close
    if tp == 1:                # an fp8 checkpoint of the layout before ([in, out] kernels) is refused, by name
        marker = json.load(open(os.path.join(out, "jaxdyn_checkpoint.json")))
        assert marker["fp8_weights"] == "[out, in]"
        del marker["fp8_weights"]
        json.dump(marker, open(os.path.join(out, "jaxdyn_checkpoint.json"), "w"))
        with pytest.raises(CheckpointError, match="older layout.*convert it again"):
            load_converted(out, mesh)


@pytest.mark.parametrize("tp", [1, 2])
def test_fp8_steps_of_few_tokens_take_the_fp8_weight_kernel(hf, tmp_path, tp, monkeypatch):
    """``RunnerConfig.fp8_kernel_max_tokens``: a step of at most that many tokens multiplies its bf16/f32
    activations by the fp8 weights (w8a16, ``pallas_kernels.fp8_matmul``; the reference on the CPU) in every
    layer, at TP 1 and per shard at TP 2: its logits are nearer the float model's than w8a8's, whose
    activations are quantized too. A limit under the step's tokens leaves the step w8a8."""
    from pallas_kernels.fp8_quantize import quantize_rows_fp8
    out = str(tmp_path / "fp8")
    convert(hf, out, dtype="float32", quant="fp8", progress=False)
    mesh = make_mesh(tp)
    q = load_converted(out, mesh)
    full = logits_of(load_hf_checkpoint(hf, mesh, dtype=jnp.float32), mesh)
    w8a8 = logits_of(q, mesh)
    w8a16 = logits_of(q, mesh, fp8_kernel_max_tokens=16)            # the step's bucket: 16 tokens
    np.testing.assert_array_equal(logits_of(q, mesh, fp8_kernel_max_tokens=8), w8a8)
    err16, err8 = np.abs(w8a16 - full).max(), np.abs(w8a8 - full).max()
    assert 0 < err16 < 0.8 * err8, (err16, err8)       # 0.61x here: the weights' rounding is most of it
    # fp8_fused_quantize: o_proj's and down_proj's inputs quantized by pallas_kernels.fp8_quantize (its reference
    # on the CPU; in float32 the same values as XLA's quantize_fp8), two calls a layer; at TP 2 it stays off
    import jaxdyn.models.llama as llama
    calls = []
    monkeypatch.setattr(llama, "quantize_rows_fp8",
                        lambda *a, **k: calls.append(len(a) + len(k)) or quantize_rows_fp8(*a, **k))
    layers = q.config.num_layers
    # o's input; silu(g) * up (from gate's and up's raw products and their scales where the MLP has no biases)
    down = 2 if q.config.mlp_bias else 3          # with biases from the scaled products (test_fp8_linear: both)
    for sites, want in (("all", [1] * layers + [down] * layers), ("o_proj", [1] * layers)):
        calls.clear()
        # (the layers traced one by one, so that the calls count each layer's: nested, one layer is traced)
        fused = logits_of(q, mesh, fp8_fused_quantize=sites, nested_layers=False)
        assert sorted(calls) == ([] if tp > 1 else want)
        np.testing.assert_allclose(fused, w8a8, rtol=1e-5, atol=1e-5 * np.abs(w8a8).max())


def test_engine_serves_a_converted_directory_like_the_hf_one(hf, tmp_path):
    from jaxdyn import LLM, SamplingParams
    out = str(tmp_path / "conv")
    convert(hf, out, dtype="float32", progress=False)
    kw = dict(dtype="float32", num_pages=16, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64)
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[256, 5, 6, 7], [256, 40, 41]]
    a = LLM(out, **kw)
    b = LLM(hf, **kw)
    assert a.tokenizer is not None and a.engine.load_info["weight_bytes"] == b.engine.load_info["weight_bytes"]
    ta = [o.outputs[0].token_ids for o in a.generate(prompts, p, use_tqdm=False)]
    tb = [o.outputs[0].token_ids for o in b.generate(prompts, p, use_tqdm=False)]
    assert ta == tb and all(len(t) == 8 for t in ta)


def test_a_format_1_checkpoint_is_refused_with_what_to_do(hf, tmp_path):
    out = str(tmp_path / "old")
    convert(hf, out, dtype="float32", progress=False)
    marker = os.path.join(out, "jaxdyn_checkpoint.json")
    m = json.load(open(marker))
    assert m["version"] == 2
    json.dump(dict(m, version=1), open(marker, "w"))
    with pytest.raises(CheckpointError, match="format version 1 .* convert it again"):
        load_converted(out, make_mesh(1))


@pytest.mark.parametrize("source, tp", [("hf", 1), ("hf", 2), ("converted", 2), ("int8", 2), ("dummy", 2)])
def test_the_plan_s_abstract_weights_are_what_loading_gives(hf, tmp_path, source, tp):
    """An engine's steps compile against plan_model's abstract state while load_weights runs: every leaf's
    shape, dtype and sharding must be the loaded one's (the runner's set_weights checks them all)."""
    from checkpoints.loader import load_weights, plan_model
    model, fmt, dtype = hf, "auto", "float32"
    if source in ("converted", "int8"):
        model = str(tmp_path / source)
        extra = ["--quant", "int8"] if source == "int8" else []
        assert main(["convert", "--hf", hf, "--out", model, "--dtype", "bfloat16", "--quiet", *extra]) == 0
        dtype = None                     # the marker's
    elif source == "dummy":
        fmt = "dummy"
    plan = plan_model(model, tp=tp, dtype=dtype, load_format=fmt, mesh=make_mesh(tp, jax.devices()[:tp]))
    assert plan.source == ("converted" if source == "int8" else source)
    assert plan.dtype == (jnp.bfloat16 if dtype is None else jnp.float32)
    loaded = load_weights(plan)
    runner = ModelRunner(plan.graphdef, plan.abstract, plan.mesh, RunnerConfig(
        num_pages=8, max_num_batched_tokens=16, max_num_seqs=1, max_model_len=64))
    runner.set_weights(loaded.state)
    kinds = {str(x.dtype) for x in jax.tree.leaves(loaded.state)}
    assert ("int8" in kinds) == (source == "int8")
    assert runner.step([SequenceWork([256, 5, 6], 0, [0])]).next_token_ids.shape == (1,)


def test_the_weights_still_to_load_are_counted_per_device(hf):
    """What sizes the KV cache from free GPU memory before the weights are there: each device's shard."""
    from checkpoints.loader import load_weights, plan_model
    from jaxdyn.engine.core import unloaded_bytes_per_device
    one = plan_model(hf, dtype="float32", mesh=make_mesh(1, jax.devices()[:1]))
    loaded = load_weights(one)
    assert unloaded_bytes_per_device(one.abstract, one.mesh) == loaded.num_bytes
    assert unloaded_bytes_per_device(loaded.state, one.mesh) == 0
    two = plan_model(hf, dtype="float32", mesh=make_mesh(2, jax.devices()[:2]))
    per_device = sum(s.data.nbytes for x in jax.tree.leaves(load_weights(two).state)
                     for s in x.addressable_shards if s.device == jax.devices()[0])
    assert unloaded_bytes_per_device(two.abstract, two.mesh) == per_device < loaded.num_bytes


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    path = make_hf_checkpoint("llama-mqa-bias", str(tmp_path_factory.mktemp("hf16")), dtype="bfloat16")
    make_byte_tokenizer(path)
    return path


@pytest.mark.parametrize("quant,tp,bf16", [("fp8", 1, False), ("fp8", 2, False), ("int8", 4, False),
                                           ("fp8", 2, True)])
def test_quantized_as_it_loads_equals_the_converted_checkpoint(hf, hf_bf16, tmp_path, quant, tp, bf16):
    """``quantization=`` on a Hugging Face directory (vLLM's ``--quantization fp8``): quantized on the devices
    as it loads, the weights, scales and shardings of ``jaxdyn convert --quant`` then loading, and logits as
    near the float model's.
    Not bit for bit: XLA's CPU divides float32 within an ulp of numpy's (half the scales here differ in their
    last bit), so a value on a rounding boundary may land one quantization step over. A converted checkpoint
    of another quantization, or of none, is refused, naming what to do."""
    from checkpoints.loader import load_model
    if bf16:                  # a bf16 file: its weights go to the devices as bf16, made float32 there
        hf = hf_bf16
    out = str(tmp_path / quant)
    convert(hf, out, dtype="float32", quant=quant, progress=False)
    mesh = make_mesh(tp)
    a = load_converted(out, mesh)
    _, b, _ = load_model(hf, dtype="float32", mesh=mesh, quantization=quant)
    assert b.config.quantization == quant and a.num_bytes == b.num_bytes
    la = jax.tree_util.tree_flatten_with_path(a.state)[0]
    lb = jax.tree_util.tree_flatten_with_path(b.state)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    from checkpoints.hf import _key
    for (path, x), (_, y) in zip(la, lb):
        name = [_key(k) for k in path if _key(k) != "value"]
        assert x.dtype == y.dtype and x.sharding == y.sharding, name
        x, y = np.asarray(x).astype(np.float32), np.asarray(y).astype(np.float32)
        if name[-1] == "scale":
            np.testing.assert_allclose(x, y, rtol=2e-7, err_msg=str(name))
            continue
        same = x == y
        if not same.all():     # quantized values on a rounding boundary: one step of the type's grid apart
            assert name[-1] in ("weight", "kernel") and same.mean() > 0.99, name
            step = 1.0 if quant == "int8" else np.maximum(np.abs(x), np.abs(y)) * 2.0 ** -3 + 2.0 ** -9
            assert (np.abs(x - y) <= step * 1.01)[~same].all(), name
    # fp8 quantizes the activations too: one weight a step over can move a token's scale, and every value
    # rounds anew after it. Both models' logits are as near the float model's as a converted one's are.
    full = logits_of(load_hf_checkpoint(hf, mesh, dtype=jnp.float32), mesh)
    for m in (a, b):
        assert 0 < np.abs(logits_of(m, mesh) - full).max() / np.abs(full).max() < 0.15
    if tp == 1:
        other = "int8" if quant == "fp8" else "fp8"
        with pytest.raises(CheckpointError, match=f"already quantized|converted checkpoint of {quant}"):
            load_model(out, dtype="float32", mesh=mesh, quantization=other)
        plain = str(tmp_path / "plain")
        convert(hf, plain, dtype="float32", progress=False)
        with pytest.raises(CheckpointError, match="converted checkpoint of float weights.*jaxdyn convert --quant"):
            load_model(plain, dtype="float32", mesh=mesh, quantization=quant)
        with pytest.raises(CheckpointError, match="quantization 'fp4'"):
            load_model(hf, dtype="float32", mesh=mesh, quantization="fp4")


def test_a_directory_without_tokenizer_json_is_served_with_a_warning(hf, tmp_path, caplog):
    """A checkpoint with only tokenizer.model (SentencePiece) was served with no tokenizer and no word: every text
    request then failed with "no tokenizer". The load now warns, naming what it found."""
    import logging

    from checkpoints.loader import load_model
    d = tmp_path / "spm"
    shutil.copytree(hf, d)
    os.remove(d / "tokenizer.json")
    (d / "tokenizer.model").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="jaxdyn.loader"):
        _, _, tok = load_model(str(d), dtype=jnp.float32)
    assert tok is None
    assert "no tokenizer.json (found tokenizer.model" in caplog.text and "token ids" in caplog.text, caplog.text


def test_a_killed_conversions_leftovers_are_removed_and_a_mount_point_is_refused(hf, tmp_path):
    """A conversion killed before it could clean up (SIGKILL, the OOM killer) left its hidden .partial-<pid>
    directory for good: the next conversion of that output removes those of dead processes (a live one's stays).
    --out naming a mount point failed only once the whole model was written (the rename into place): refused first."""
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    gone = tmp_path / f".out.partial-{dead.pid}"
    alive = tmp_path / f".out.partial-{os.getppid()}"
    for d in (gone, alive):
        (d / "params").mkdir(parents=True)
    convert(hf, str(out), progress=False)
    assert not gone.exists() and alive.exists() and is_converted(str(out))
    assert os.path.ismount("/dev/shm")
    with pytest.raises(CheckpointError, match="a mount point"):
        convert(hf, "/dev/shm", force=True, progress=False)
