"""``fp8_fused_norm``: an fp8 model's residual adds, RMSNorms and input quantizations in one kernel a site
(``pallas_kernels.rms_norm_fp8``), the MLP's output left to the next layer's kernel (``llama.Residual``)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.hf import load_hf_checkpoint
from jaxdyn import EngineConfig, EngineCore, SamplingParams
from jaxdyn.config import ModelConfig
from jaxdyn.parallel.sharding import make_mesh
from tests.support import make_hf_checkpoint, one_chunk

CFG = EngineConfig(num_pages=48, page_size=16, max_num_batched_tokens=32, max_num_seqs=8, max_model_len=128,
                   token_buckets=(8, 32), page_buckets=(8,))
PROMPTS = [[5, 9, 200, 17, 3, 3, 40], list(range(30, 70)), [7]]


def _model(tmp_path, family, dtype=jnp.bfloat16):
    path = make_hf_checkpoint(family, str(tmp_path / family))
    with open(os.path.join(path, "config.json")) as f:
        cfg = dataclasses.replace(ModelConfig.from_dict(json.load(f)), quantization="fp8")
    mesh = make_mesh(1)
    return mesh, load_hf_checkpoint(path, mesh, dtype=dtype, config=cfg)


def _generate(mesh, model, **options):
    """({request: greedy tokens}, [each prompt token's logprob given the ones before it, every prompt in turn]): the
    tokens from requests without prompt logprobs (their steps fill the 32-token bucket), the scores from a second
    run with them."""
    eng = EngineCore(model.graphdef, model.state, mesh, model.config, None, dataclasses.replace(CFG, **options))
    out, scores = {}, {}
    for scored in (False, True):
        p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=1 if scored else None)
        for i, prompt in enumerate(PROMPTS):
            eng.add_request(f"{i}{'s' if scored else ''}", prompt, p)
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished and not scored:
                    out[o.request_id] = list(o.outputs[0].token_ids)
                elif o.finished:
                    scores[o.request_id] = [e[t].logprob for e, t in zip(o.prompt_logprobs[1:],
                                                                         PROMPTS[int(o.request_id[:-1])][1:])]
    assert eng.allocator.num_in_use == 0
    return out, np.concatenate([scores[f"{i}s"] for i in range(len(PROMPTS))])


@pytest.mark.parametrize("family", ["llama3.1", "qwen3", "qwen2"])
def test_fused_norm_generates_what_the_unfused_layers_do(tmp_path, monkeypatch, family):
    """The same greedy tokens and prompt logprobs with the fused layers as without, through the kernel's
    reference (the same operations: bit-identical on the CPU, whose XLA keeps the norm's bf16 rounding), which
    runs at 2 x layers - 1 sites a step (the first layer's input norm has nothing to add and stays XLA's)."""
    import jaxdyn.models.llama as llama
    from pallas_kernels.rms_norm_fp8 import add_rms_norm_fp8
    mesh, model = _model(tmp_path, family)
    tokens, scores = _generate(mesh, model, fp8_fused_norm=False)
    calls = []
    monkeypatch.setattr(llama, "add_rms_norm_fp8",
                        lambda x, *a, **kw: calls.append(x.shape[0]) or add_rms_norm_fp8(x, *a, impl="reference", **kw))
    fused_tokens, fused_scores = _generate(mesh, model, fp8_fused_norm=True)
    assert fused_tokens == tokens
    np.testing.assert_array_equal(fused_scores, scores)
    # each trace of the layers: the first layer once (its post-attention norm), the other layers' trace twice; both
    # token buckets
    layers = model.config.num_layers
    assert sorted(set(calls)) == [8, 32] and len(calls) % (1 + 2 * (layers > 1)) == 0


def test_the_fused_kernel_in_the_model_equals_the_unfused_layers(tmp_path, monkeypatch):
    """The kernel itself (Pallas interpret mode) in the model's forward, run op by op (``jax.disable_jit``: under
    jit XLA's CPU compiler keeps some bf16 intermediates of the unfused norm in float32, which moves a logit by
    as much as a fused quantization does), gives the unfused model's hidden states bit for bit; qwen2: a bias on
    q/k/v, tied embeddings."""
    from flax import nnx

    import jaxdyn.models.llama as llama
    from jaxdyn.kv.cache import KVCacheSpec, allocate_kv_cache
    from jaxdyn.parallel.sharding import stored_kv_heads
    from pallas_kernels.rms_norm_fp8 import add_rms_norm_fp8
    mesh, loaded = _model(tmp_path, "qwen2")
    cfg = loaded.config
    spec = KVCacheSpec(cfg.num_layers, stored_kv_heads(cfg.num_kv_heads, 1), 8, 16, cfg.head_dim, jnp.bfloat16)
    md, ids = one_chunk(20)
    model = nnx.merge(loaded.graphdef, loaded.state)
    calls = []
    monkeypatch.setattr(llama, "add_rms_norm_fp8",
                        lambda *a, **kw: calls.append(1) or add_rms_norm_fp8(*a, impl="interpret", **kw))
    with jax.disable_jit():
        _, off = model(allocate_kv_cache(spec, mesh), ids, md)
        assert not calls
        _, fused = model(allocate_kv_cache(spec, mesh), ids, md, fp8_fused_norm=True)
    assert len(calls) == 2 * cfg.num_layers - 1
    np.testing.assert_array_equal(np.asarray(fused, np.float32), np.asarray(off, np.float32))


def test_fused_norm_falls_back_where_it_does_not_apply(tmp_path, monkeypatch):
    """A bias on down_proj (and o_proj) leaves the layers unfused: the kernel is never called, the tokens are the
    unfused ones; a bf16 model resolves the option off, "auto" resolves on for an fp8 model on a GPU only."""
    import jaxdyn.models.llama as llama
    from jaxdyn.engine.core import FP8_FUSED_NORM, fp8_fused_norm
    mesh, model = _model(tmp_path, "llama-mqa-bias")
    tokens, scores = _generate(mesh, model, fp8_fused_norm=False)
    monkeypatch.setattr(llama, "add_rms_norm_fp8", lambda *a, **kw: pytest.fail("the kernel was called"))
    fused_tokens, fused_scores = _generate(mesh, model, fp8_fused_norm=True)
    assert fused_tokens == tokens
    np.testing.assert_array_equal(fused_scores, scores)
    bf16 = dataclasses.replace(model.config, quantization=None)
    assert fp8_fused_norm(EngineConfig(fp8_fused_norm=True), bf16, "gpu") is False
    assert fp8_fused_norm(EngineConfig(fp8_fused_norm=True), model.config, "cpu") is True
    assert fp8_fused_norm(EngineConfig(), model.config, "cpu") is False
    assert fp8_fused_norm(EngineConfig(), model.config, "gpu") is FP8_FUSED_NORM is True     # measured: on
    for bad in ("on", 1, np.True_, None):
        with pytest.raises(ValueError, match="fp8_fused_norm"):
            EngineConfig(fp8_fused_norm=bad)
