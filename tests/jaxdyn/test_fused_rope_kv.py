"""``fused_rope_kv``: each layer's rotary embedding of q and k and its K/V write in one kernel
(``pallas_kernels.rope_kv``) instead of XLA's operations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn import EngineConfig, EngineCore, SamplingParams
from jaxdyn.parallel.sharding import make_mesh
from tests.support import make_hf_checkpoint, one_chunk

CFG = EngineConfig(num_pages=48, page_size=16, max_num_batched_tokens=32, max_num_seqs=8, max_model_len=128,
                   token_buckets=(8, 32), page_buckets=(8,))
PROMPTS = [[5, 9, 200, 17, 3, 3, 40], list(range(30, 70)), [7]]


def _model(tmp_path, family, quantization=None):
    import json
    import os

    from checkpoints.hf import load_hf_checkpoint
    from jaxdyn.config import ModelConfig
    path = make_hf_checkpoint(family, str(tmp_path / family))
    with open(os.path.join(path, "config.json")) as f:
        cfg = dataclasses.replace(ModelConfig.from_dict(json.load(f)), quantization=quantization)
    mesh = make_mesh(1)
    return mesh, load_hf_checkpoint(path, mesh, dtype=jnp.bfloat16, config=cfg)


def _generate(mesh, model, **options):
    """{request: greedy tokens} of PROMPTS (each prompt twice: the second time after the first's pages are freed
    and reused), every page back at the end."""
    eng = EngineCore(model.graphdef, model.state, mesh, model.config, None, dataclasses.replace(CFG, **options))
    out = {}
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for rnd in range(2):
        for i, prompt in enumerate(PROMPTS):
            eng.add_request(f"{rnd}-{i}", prompt, p)
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = list(o.outputs[0].token_ids)
    assert eng.allocator.num_in_use == 0
    return out


@pytest.mark.parametrize("family,quantization", [("llama3.1", None), ("llama3.1", "fp8"), ("qwen2", None)])
def test_fused_rope_kv_generates_what_the_unfused_layers_do(tmp_path, monkeypatch, family, quantization):
    """The same greedy tokens with the option on as off, through the kernel's reference (the same operations),
    which every layer of every step calls (both token buckets); qwen2: a bias on q/k/v."""
    import jaxdyn.models.llama as llama
    from pallas_kernels.rope_kv import rope_write_kv
    mesh, model = _model(tmp_path, family, quantization)
    tokens = _generate(mesh, model, fused_rope_kv=False)
    calls = []
    monkeypatch.setattr(llama, "rope_write_kv",
                        lambda qkv, *a, **kw: calls.append(qkv.shape[0]) or rope_write_kv(qkv, *a, impl="reference",
                                                                                          **kw))
    assert _generate(mesh, model, fused_rope_kv=True) == tokens
    assert sorted(set(calls)) == [8, 32] and len(calls) % model.config.num_layers == 0


def _interpreted_fp8_chunk(tmp_path, monkeypatch, seen):
    """(model, config, metadata, ids, fresh fp8 pages) of the fp8 llama3.1 test model and a chunk of 20 tokens, two
    of its rows padding (page ``num_pages``); the model's ``rope_write_kv`` runs the kernel in interpret mode,
    each call's keyword arguments appended to ``seen``."""
    from flax import nnx

    import jaxdyn.models.llama as llama
    from jaxdyn.kv.cache import KVCacheSpec, allocate_kv_cache
    from pallas_kernels.rope_kv import rope_write_kv
    mesh, loaded = _model(tmp_path, "llama3.1", "fp8")
    cfg = loaded.config
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, 8, 16, cfg.head_dim, jnp.float8_e4m3fn)
    md, ids = one_chunk(20, padding=2)
    monkeypatch.setattr(llama, "rope_write_kv",
                        lambda *a, **kw: seen.append(kw) or rope_write_kv(*a, impl="interpret", **kw))
    return nnx.merge(loaded.graphdef, loaded.state), cfg, md, ids, lambda: allocate_kv_cache(spec, mesh)


def _assert_bit_for_bit(on, kv_on, off, kv_off, rows: int):
    np.testing.assert_array_equal(np.asarray(on, np.float32)[:rows], np.asarray(off, np.float32)[:rows])
    for a, b in zip(jax.tree.leaves(kv_on), jax.tree.leaves(kv_off)):
        np.testing.assert_array_equal(np.asarray(a.view(jnp.uint8)), np.asarray(b.view(jnp.uint8)))


def test_the_kernel_in_the_model_equals_the_unfused_layers(tmp_path, monkeypatch):
    """The kernel itself (Pallas interpret mode) in the model's forward, run op by op, gives the unfused model's
    hidden states and pages bit for bit over fp8 pages, two of the step's rows padding (page ``num_pages``)."""
    calls = []
    model, cfg, md, ids, pages = _interpreted_fp8_chunk(tmp_path, monkeypatch, calls)
    with jax.disable_jit():
        kv_off, off = model(pages(), ids, md)
        assert not calls
        kv_on, on = model(pages(), ids, md, fused_rope_kv=True)
    assert len(calls) == cfg.num_layers
    _assert_bit_for_bit(on, kv_on, off, kv_off, 20 - 2)


def test_under_fused_norms_the_kernel_scales_the_raw_fp8_product(tmp_path, monkeypatch):
    """An fp8 model with the fused norms (its layers' q/k/v product on an input quantized by the norm kernel) hands
    the kernel the product's raw result and its rows' and channels' scales (no XLA kernel scales it first): in
    Pallas interpret mode, op by op, the hidden states and pages are the unfused rotation's bit for bit."""
    calls = []
    model, cfg, md, ids, pages = _interpreted_fp8_chunk(tmp_path, monkeypatch, calls)
    n = 20
    width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    with jax.disable_jit():
        kv_off, off = model(pages(), ids, md, fp8_fused_norm=True)
        assert not calls
        kv_on, on = model(pages(), ids, md, fp8_fused_norm=True, fused_rope_kv=True)
        # without the fused norms the layers' input is not quantized ahead: the kernel takes the scaled product
        model(pages(), ids, md, fused_rope_kv=True)
    scales = [kw.get("scales") for kw in calls]
    assert len(scales) == 2 * cfg.num_layers
    assert all(s is not None and s[0].shape == (n,) and s[1].shape == (width,) for s in scales[:cfg.num_layers])
    assert all(s is None for s in scales[cfg.num_layers:])
    _assert_bit_for_bit(on, kv_on, off, kv_off, n - 2)


def test_the_option_resolves_and_falls_back(tmp_path):
    """"auto" is FUSED_ROPE_KV on a GPU and off elsewhere; True / False as given; anything else refused. A model with
    q/k norms (qwen3) or heads that are not powers of two keeps XLA's rotation."""
    import json
    import os

    from jaxdyn.config import ModelConfig
    from jaxdyn.engine.core import FUSED_ROPE_KV, fused_rope_kv
    from jaxdyn.models.llama import Attention, AttentionOptions
    assert fused_rope_kv(EngineConfig(), "gpu") is FUSED_ROPE_KV
    assert fused_rope_kv(EngineConfig(), "cpu") is False
    assert fused_rope_kv(EngineConfig(fused_rope_kv=True), "cpu") is True
    assert fused_rope_kv(EngineConfig(fused_rope_kv=False), "gpu") is False
    for bad in ("on", 1, None):
        with pytest.raises(ValueError, match="fused_rope_kv"):
            EngineConfig(fused_rope_kv=bad)
    with open(os.path.join(make_hf_checkpoint("llama3.1", str(tmp_path)), "config.json")) as f:
        base = ModelConfig.from_dict(json.load(f))
    on = AttentionOptions(fused_rope_kv=True)
    for extra, fuses in (({}, True), (dict(qk_norm=True), False), (dict(num_heads=6, hidden_size=96), False),
                         (dict(head_dim=24), False)):
        attn = Attention(dataclasses.replace(base, **extra), 0, mesh=make_mesh(1), dtype=jnp.bfloat16)
        assert attn.fuses_rope_kv(on) is fuses, extra
        assert attn.fuses_rope_kv(AttentionOptions()) is False


@pytest.mark.parametrize("family,tp", [("llama3.1", 2), ("llama-mqa-bias", 2)])
def test_the_kernel_under_tensor_parallelism_equals_the_unfused_layers(tmp_path, monkeypatch, family, tp):
    """Over a model axis of 2 devices (merge_qkv's layout: each shard's own q, k and v heads; the MQA model's one kv
    head replicated to each shard), a float32 model jitted with the kernel in interpret mode gives the unfused
    model's hidden states and pages bit for bit, a padding row's slot dropped."""
    from flax import nnx

    import jaxdyn.models.llama as llama
    from checkpoints.hf import load_hf_checkpoint
    from jaxdyn.kv.cache import KVCacheSpec, allocate_kv_cache
    from jaxdyn.parallel.sharding import stored_kv_heads
    from pallas_kernels.rope_kv import rope_write_kv
    mesh = make_mesh(tp, jax.devices()[:tp])
    loaded = load_hf_checkpoint(make_hf_checkpoint(family, str(tmp_path)), mesh, dtype=jnp.float32)
    cfg = loaded.config
    spec = KVCacheSpec(cfg.num_layers, stored_kv_heads(cfg.num_kv_heads, tp), 8, 16, cfg.head_dim, jnp.float32)
    n = 20
    md, ids = one_chunk(n, padding=2)
    calls = []
    monkeypatch.setattr(llama, "rope_write_kv",
                        lambda *a, **kw: calls.append(kw["num_kv_heads"]) or rope_write_kv(*a, impl="interpret", **kw))

    @nnx.jit(static_argnames=("fused",))
    def forward(model, kv, ids, md, fused):
        return model(kv, ids, md, fused_rope_kv=fused)

    model = nnx.merge(loaded.graphdef, loaded.state)
    kv_off, off = forward(model, allocate_kv_cache(spec, mesh), ids, md, False)
    kv_on, on = forward(model, allocate_kv_cache(spec, mesh), ids, md, True)
    assert calls and set(calls) == {spec.num_kv_heads // tp}          # a shard's kv heads
    np.testing.assert_array_equal(np.asarray(on)[:n - 2], np.asarray(off)[:n - 2])
    for a, b in zip(jax.tree.leaves(kv_on), jax.tree.leaves(kv_off)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
@pytest.mark.parametrize("pages", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_gpu_the_kernel_in_the_jitted_model(tmp_path, pages):
    """On the GPU, the model jitted with the kernel (its pages donated and updated in place) against XLA's unfused
    layers: hidden states and pages within the rotation's one bf16 rounding (XLA rotates in float32 and rounds
    once; the kernel rounds each operation), the padding row's slot untouched."""
    from flax import nnx

    from jaxdyn.kv.cache import KVCacheSpec, allocate_kv_cache
    mesh, loaded = _model(tmp_path, "llama3.1")
    cfg = loaded.config
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, 8, 16, cfg.head_dim, pages)
    n = 20
    md, ids = one_chunk(n, padding=2)

    @nnx.jit(static_argnames=("fused",), donate_argnums=(1,))
    def forward(model, kv, ids, md, fused):
        return model(kv, ids, md, fused_rope_kv=fused)

    model = nnx.merge(loaded.graphdef, loaded.state)
    for fused in (False, True):        # the kernel in the fused program only
        text = forward.lower(model, allocate_kv_cache(spec, mesh), ids, md, fused).as_text()
        assert ("rope_write_kv" in text) == fused
    kv_off, off = forward(model, allocate_kv_cache(spec, mesh), ids, md, False)
    kv_on, on = forward(model, allocate_kv_cache(spec, mesh), ids, md, True)
    on, off = np.asarray(on, np.float32)[:n - 2], np.asarray(off, np.float32)[:n - 2]
    np.testing.assert_allclose(on, off, rtol=0.05, atol=0.05 * np.abs(off).max())
    for a, b in zip(jax.tree.leaves(kv_on), jax.tree.leaves(kv_off)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0.07, atol=0.07 * np.abs(b).max())
        # the 18 real tokens fill page 5 and two slots of page 2; every other slot stays 0 (the padding rows'
        # slots are out of range: dropped)
        written = np.zeros(a.shape[1:3], bool)
        written[5] = True
        written[2, :2] = True
        assert a[:, written].any(axis=-1).all() and not a[:, ~written].any()
