"""An fp8 model's lm_head in fp8 too (``--quantize-lm-head``): converted, quantized as it loads, random; its
logits are the fp8 x fp8 product of the rows and the vocabulary rows, scaled; bad combinations are refused."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from checkpoints.convert import convert, load_converted
from checkpoints.hf import CheckpointError, load_hf_checkpoint
from checkpoints.loader import load_model
from jaxdyn.config import ConfigError, ModelConfig
from jaxdyn.parallel.sharding import make_mesh
from serving.cli import main
from tests.checkpoints.test_convert import logits_of
from tests.support import make_byte_tokenizer, make_hf_checkpoint


@pytest.fixture(scope="module", params=["llama3.1", "llama3.2-tied"])
def hf(request, tmp_path_factory):
    path = make_hf_checkpoint(request.param, str(tmp_path_factory.mktemp("hf")))
    make_byte_tokenizer(path)
    return path


def _head(loaded):
    head = loaded.state["lm_head"]
    return head["weight"][...], head["scale"][...]


@pytest.mark.parametrize("tp", [1, 2])
def test_converted_and_loaded_heads_agree_and_run_near_the_float_head(hf, tmp_path, tp):
    """The head is fp8 [vocab, hidden] with a float32 scale a vocabulary row, split over the vocabulary at TP 2;
    a tied model keeps its float embedding for the lookup beside the head's fp8 copy of it. Converting and
    quantizing as it loads give the same head (within one step of fp8's grid), and the logits move from the
    float head's by fp8's rounding, not more."""
    mesh = make_mesh(tp)
    out = str(tmp_path / "fp8-head")
    assert main(["convert", "--hf", hf, "--out", out, "--dtype", "float32", "--quant", "fp8",
                 "--quantize-lm-head", "--quiet"]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["jaxdyn_quantization"] == "fp8" and cfg["jaxdyn_quantize_lm_head"] is True
    a = load_converted(out, mesh)
    _, b, _ = load_model(hf, dtype="float32", mesh=mesh, quantization="fp8", quantize_lm_head=True)
    plain_head = str(tmp_path / "fp8")
    convert(hf, plain_head, dtype="float32", quant="fp8", progress=False)
    c = load_converted(plain_head, mesh)
    full = load_hf_checkpoint(hf, mesh, dtype=jnp.float32)
    vocab, hidden = full.config.vocab_size, full.config.hidden_size
    for m in (a, b):
        assert m.config.quantize_lm_head
        w, s = _head(m)
        assert w.dtype == jnp.float8_e4m3fn and w.shape == (vocab, hidden)
        assert s.dtype == jnp.float32 and s.shape == (vocab,)
        assert w.sharding.shard_shape(w.shape) == (vocab // tp, hidden) and s.sharding.shard_shape(s.shape) == (vocab // tp,)
        assert m.state["embed_tokens"]["embedding"][...].dtype == jnp.float32     # the lookup's table stays float
        assert m.num_bytes == c.num_bytes - (0 if full.config.tie_word_embeddings else vocab * hidden * 4) \
            + vocab * hidden + vocab * 4
    # the head is the float head's (or the tied embedding's) quantized per vocabulary row
    src = np.asarray(full.state["embed_tokens"]["embedding"][...] if full.config.tie_word_embeddings
                     else full.state["lm_head"]["kernel"][...].T)
    wa, sa = (np.asarray(x).astype(np.float32) for x in _head(a))
    np.testing.assert_allclose(sa, np.abs(src).max(1) / 448.0, rtol=1e-6)
    assert (np.abs(wa * sa[:, None] - src) <= np.abs(src) * 2.0 ** -4 + sa[:, None] * 2.0 ** -9).all()
    wb, sb = (np.asarray(x).astype(np.float32) for x in _head(b))
    np.testing.assert_allclose(sb, sa, rtol=2e-7)
    assert (np.abs(wa - wb) <= np.maximum(np.abs(wa), np.abs(wb)) * 2.0 ** -3 + 2.0 ** -9).all()
    la, lb, lc, lf = (logits_of(m, mesh) for m in (a, b, c, full))
    assert not np.array_equal(la, lc)        # the head is quantized: its logits are not the float head's
    for got in (la, lb):
        assert np.abs(got - lc).max() / np.abs(lc).max() < 0.08
        assert np.abs(got - lf).max() / np.abs(lf).max() < 0.15


def test_the_fp8_head_is_one_scaled_fp8_product_of_the_quantized_rows(hf):
    """``compute_logits`` with an fp8 head: each row quantized with its own scale (absolute maximum / 448), the
    fp8 x fp8 product rounded to bf16 (``FP8_LOGITS_PRODUCT``), times the row's and the vocabulary row's scales:
    numpy's figures."""
    from flax import nnx
    mesh = make_mesh(1)
    _, m, _ = load_model(hf, dtype="float32", mesh=mesh, quantization="fp8", quantize_lm_head=True)
    model = nnx.merge(m.graphdef, m.state)
    hidden = np.random.default_rng(0).standard_normal((5, m.config.hidden_size)).astype(np.float32)
    hidden[2] *= 40.0                   # a row's scale is its own: the other rows' values do not move
    got = np.asarray(model.compute_logits(jnp.asarray(hidden)))
    sx = np.abs(hidden).max(1, keepdims=True) / 448.0
    xq = (hidden / sx).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    w, s = (np.asarray(x).astype(np.float32) for x in _head(m))
    want = (xq @ w.T).astype(ml_dtypes.bfloat16).astype(np.float32) * sx * s
    # within a bf16 step of the product (XLA's float32 sums may round to the neighbour of numpy's)
    np.testing.assert_allclose(got, want, rtol=2.0 ** -8, atol=1e-5 * np.abs(want).max())
    alone = np.asarray(model.compute_logits(jnp.asarray(hidden[:2])))
    np.testing.assert_array_equal(alone, got[:2])


def test_an_engine_generates_with_random_fp8_heads():
    """Random weights (``--load-format dummy``) get an fp8 head, and the engine runs on it (its logits' width is
    the vocabulary's)."""
    from jaxdyn import LLM, SamplingParams
    llm = LLM("tiny", load_format="dummy", quantization="fp8", quantize_lm_head=True, max_num_seqs=2,
              max_num_batched_tokens=32, max_model_len=64)
    assert llm.engine.model_config.quantize_lm_head
    runner = llm.engine.runner
    head = dict(zip(runner._state_names, runner.state))["['lm_head']['weight'].value"]
    assert head.dtype == jnp.float8_e4m3fn and head.shape == (llm.engine.model_config.vocab_size,
                                                              llm.engine.model_config.hidden_size)
    out = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
    assert all(0 <= t < llm.engine.model_config.vocab_size for o in out for t in o.outputs[0].token_ids)


def test_bad_combinations_are_refused_by_name(hf, tmp_path, capsys):
    mesh = make_mesh(1)
    with pytest.raises(CheckpointError, match="only an fp8 model's lm_head.*add --quantization fp8"):
        load_model(hf, dtype="float32", mesh=mesh, quantize_lm_head=True)
    with pytest.raises(CheckpointError, match="only an fp8 model's lm_head.*int8"):
        load_model(hf, dtype="float32", mesh=mesh, quantization="int8", quantize_lm_head=True)
    out = str(tmp_path / "fp8")
    convert(hf, out, dtype="float32", quant="fp8", progress=False)
    with pytest.raises(CheckpointError, match="converted checkpoint with a float lm_head.*--quantize-lm-head"):
        load_model(out, dtype="float32", mesh=mesh, quantize_lm_head=True)
    assert main(["convert", "--quiet", "--hf", hf, "--out", str(tmp_path / "x"), "--quant", "int8",
                 "--quantize-lm-head"]) == 2
    assert "--quantize-lm-head needs --quant fp8 (not int8)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    base = json.load(open(os.path.join(hf, "config.json")))
    with pytest.raises(ConfigError, match="quantize_lm_head: only an fp8 model's"):
        ModelConfig.from_dict({**base, "jaxdyn_quantize_lm_head": True})
    import dataclasses
    with pytest.raises(ConfigError, match="quantization is 'int8'"):      # the Python API checks it too
        dataclasses.replace(ModelConfig.from_dict(base), quantization="int8", quantize_lm_head=True)
    with pytest.raises(ConfigError, match="expected true or false"):
        ModelConfig.from_dict({**base, "jaxdyn_quantization": "fp8", "jaxdyn_quantize_lm_head": "yes"})
    assert main(["serve", "--workers", "127.0.0.1:1", "--quantize-lm-head", "--model", hf]) == 2
    assert "--workers and --quantize-lm-head" in capsys.readouterr().err


def test_prefill_and_decode_meshes_both_get_the_fp8_head():
    """``build_disagg_engine(quantize_lm_head=True)``: both meshes' models have the fp8 head, and a prompt prefilled
    on one and decoded on the other (its KV handed over) gives the greedy tokens of one engine."""
    from jaxdyn import LLM, EngineConfig, SamplingParams
    from jaxdyn.disagg.policy import DisaggPolicy
    from jaxdyn.engine.llm import build_disagg_engine, build_engine
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=64)
    kw = dict(load_format="dummy", quantization="fp8", quantize_lm_head=True, config=cfg)
    prompt, params = list(range(1, 21)), SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0)
    eng = build_disagg_engine("tiny", prefill_devices=[0], decode_devices=[1],
                              policy=DisaggPolicy(min_remote_tokens=8), **kw)
    try:
        assert eng.prefill.model_config.quantize_lm_head and eng.decode.model_config.quantize_lm_head
        for side in (eng.prefill, eng.decode):       # the weights each mesh's runner holds
            head = dict(zip(side.runner._state_names, side.runner.state))["['lm_head']['weight'].value"]
            assert head.dtype == jnp.float8_e4m3fn
        got = LLM(engine=eng).generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert eng.metrics.kv_transfers == 1
    finally:
        eng.shutdown()
    want = LLM(engine=build_engine("tiny", **kw)).generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == want and len(got) == 5
