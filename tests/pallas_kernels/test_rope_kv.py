"""``pallas_kernels.rope_kv``: q's and k's rotary embedding and the K/V write into the pages in one kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rope_kv import (apply_rope, kernel_supports, rope_write_kv, rope_write_kv_reference, to_pages_dtype,
                                    write_pages)


def _inputs(t, hq, hk, d, num_pages, page_size, pages_dtype, seed=0):
    """qkv (large enough that fp8 pages saturate some keys), cos/sin of scattered positions, pages filled with
    noise (so an untouched slot is seen), and slots: distinct, two of them padding (page ``num_pages``)."""
    k = jax.random.split(jax.random.key(seed), 4)
    qkv = (jax.random.normal(k[0], (t, (hq + 2 * hk) * d)) * 200).astype(jnp.bfloat16)
    qkv = qkv.at[0, -1].set(jnp.nan)                          # a NaN value: NaN in the pages too, not saturated
    pos = jax.random.randint(k[1], (t,), 0, 4000)
    inv_freq = 1.0 / (500000.0 ** (np.arange(0, d, 2) / d))
    freqs = pos.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb).astype(jnp.bfloat16), jnp.sin(emb).astype(jnp.bfloat16)
    kp = jax.random.normal(k[2], (hk, num_pages, page_size, d)).astype(pages_dtype)
    vp = jax.random.normal(k[3], (hk, num_pages, page_size, d)).astype(pages_dtype)
    slots = np.random.default_rng(seed).permutation(num_pages * page_size)[:t]
    page, offset = slots // page_size, slots % page_size
    page[[1, t - 1]] = num_pages                              # padding rows
    return qkv, cos, sin, kp, vp, jnp.asarray(page, jnp.int32), jnp.asarray(offset, jnp.int32)


def _scales(qkv, seed=0):
    """An fp8 product's rows' and channels' float32 scales for ``qkv`` as its raw result (``scales=``)."""
    k = jax.random.split(jax.random.key(seed + 100), 2)
    t, w = qkv.shape
    return (jax.random.uniform(k[0], (t,), jnp.float32, 0.25, 2.0),
            jax.random.uniform(k[1], (w,), jnp.float32, 0.25, 2.0))


def _bits(a):
    return np.asarray(a.view(jnp.uint8) if a.dtype == jnp.float8_e4m3fn else a.view(jnp.uint16))


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("pages_dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
@pytest.mark.parametrize("t,hq,hk,d", [(5, 4, 2, 32), (12, 8, 1, 64), (9, 32, 8, 128)])
def test_interpret_mode_equals_the_reference_bit_for_bit(pages_dtype, t, hq, hk, d, scaled):
    """The kernel (Pallas interpret mode) gives the reference's q and pages bit for bit: rotated values, fp8
    saturation, slots written, padding's dropped, every other slot untouched; with ``scales``, of the raw product
    scaled as the model's ``fp8_scale`` scales it (the reference's ``scale_product`` is asserted to be that)."""
    args = _inputs(t, hq, hk, d, num_pages=7, page_size=4, pages_dtype=pages_dtype, seed=t)
    kw = dict(num_q_heads=hq, num_kv_heads=hk, scales=_scales(args[0], t) if scaled else None)
    got = rope_write_kv(*args, impl="interpret", **kw)
    want = rope_write_kv(*args, impl="reference", **kw)
    if scaled:
        from jaxdyn.models.llama import fp8_scale
        row, col = kw["scales"]
        same = rope_write_kv(fp8_scale(args[0], row[:, None], col, args[0].dtype), *args[1:], num_q_heads=hq,
                             num_kv_heads=hk, impl="reference")
        for a, b in zip(same, want):
            np.testing.assert_array_equal(_bits(a), _bits(b))
        unscaled = rope_write_kv(*args, num_q_heads=hq, num_kv_heads=hk, impl="reference")
        assert (_bits(unscaled[0]) != _bits(want[0])).mean() > 0.5
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(_bits(g), _bits(w))
    kp = args[3]
    written = np.zeros(kp.shape[1:3], bool)
    page, offset = np.asarray(args[5]), np.asarray(args[6])
    written[page[page < 7], offset[page < 7]] = True
    np.testing.assert_array_equal(_bits(got[1])[:, ~written], _bits(kp)[:, ~written])     # untouched slots
    assert (_bits(got[1])[:, written] != _bits(kp)[:, written]).any()
    k = np.asarray(got[1], np.float32)
    assert np.isfinite(k).all()                    # the NaN is a value's (the last column of the last v head)
    if pages_dtype == jnp.float8_e4m3fn:           # saturated
        assert np.abs(k).max() == 448
    v = np.asarray(got[2], np.float32)
    assert np.isnan(v[-1, page[0], offset[0], -1]) and np.isnan(v).sum() == 1


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("tokens", [2, 4])
def test_programs_of_several_tokens_equal_the_reference_bit_for_bit(tokens, scaled):
    """A program taking a block of tokens (the channels' scales read once for them) writes what a program a token
    writes: the reference's q and pages bit for bit (interpret mode), padding's slots dropped; a block that does
    not divide the tokens is refused."""
    from pallas_kernels.rope_kv import rope_write_kv_kernel
    t, hq, hk, d = 12, 8, 2, 32
    args = _inputs(t, hq, hk, d, num_pages=7, page_size=4, pages_dtype=jnp.float8_e4m3fn, seed=3)
    scales = _scales(args[0], 3) if scaled else None
    got = rope_write_kv_kernel(*args, scales, num_q_heads=hq, num_kv_heads=hk, interpret=True, tokens=tokens)
    want = rope_write_kv(*args, num_q_heads=hq, num_kv_heads=hk, scales=scales, impl="reference")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(_bits(g), _bits(w))
    with pytest.raises(ValueError, match="do not divide"):
        rope_write_kv_kernel(*args, scales, num_q_heads=hq, num_kv_heads=hk, interpret=True, tokens=5)


def test_tokens_a_program():
    """One token a program without scales; with them blocks of up to 16 tokens, dividing the call, that leave at
    least 132 programs (8 at the 2,048-token step, 1 at 16)."""
    from pallas_kernels.rope_kv import tokens_per_program
    assert [tokens_per_program(t, True) for t in (16, 192, 256, 384, 512, 768, 2048, 8192, 1000)] == \
        [1, 1, 1, 2, 2, 4, 8, 16, 4]
    assert tokens_per_program(2048, False) == 1


def test_slots_out_of_range_are_dropped_by_both():
    """A negative page, a negative offset and an offset past the page write nothing, in the kernel (interpret mode)
    and in the reference (whose indexing would count a negative index from the end)."""
    args = list(_inputs(6, 4, 2, 32, num_pages=7, page_size=4, pages_dtype=jnp.bfloat16))
    args[5] = jnp.asarray([-1, 7, 3, 3, 2, 0], jnp.int32)
    args[6] = jnp.asarray([0, 0, -1, 4, 1, 3], jnp.int32)
    got = rope_write_kv(*args, num_q_heads=4, num_kv_heads=2, impl="interpret")
    want = rope_write_kv(*args, num_q_heads=4, num_kv_heads=2, impl="reference")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(_bits(g), _bits(w))
    changed = np.argwhere((_bits(got[1]) != _bits(args[3])).any(axis=(0, 3)))
    assert sorted(map(tuple, changed)) == [(0, 3), (2, 1)]


def test_the_reference_is_the_model_s_unfused_layer():
    """The reference is the split of merge_qkv's layout, ``apply_rope`` on q and k and ``write_pages``, which the
    model's unfused layer runs: the model's ``apply_rope`` and the cache's ``write_kv`` are the module's own (the
    identity asserted), so what the values compare is the reference's split against ``split_qkv`` (one shard;
    ``tests/jaxdyn/test_fused_rope_kv.py`` compares the model's layers under two)."""
    from jaxdyn.kv.cache import write_kv
    from jaxdyn.models.llama import apply_rope as model_rope
    from jaxdyn.models.llama import split_qkv
    t, hq, hk, d = 6, 8, 2, 64
    qkv, cos, sin, kp, vp, page, offset = _inputs(t, hq, hk, d, 5, 4, jnp.float8_e4m3fn)
    q, k, v = split_qkv(qkv, hq * d, hk * d, 1)
    q, k = (model_rope(a.reshape(t, -1, d), cos, sin) for a in (q, k))
    nk, nv = write_kv(kp, vp, k, v.reshape(t, hk, d), page, offset)
    rq, rk, rv = rope_write_kv_reference(qkv, cos, sin, kp, vp, page, offset, num_q_heads=hq, num_kv_heads=hk)
    for a, b in ((q, rq), (nk, rk), (nv, rv)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    assert model_rope is apply_rope and write_kv is write_pages


def test_bad_inputs_and_unsupported_shapes_are_refused():
    qkv, cos, sin, kp, vp, page, offset = _inputs(4, 4, 2, 32, 5, 4, jnp.bfloat16)
    with pytest.raises(ValueError, match="q heads"):
        rope_write_kv(qkv, cos, sin, kp, vp, page, offset, num_q_heads=2, num_kv_heads=2)
    with pytest.raises(ValueError, match="cos, sin"):
        rope_write_kv(qkv, cos[:3], sin, kp, vp, page, offset, num_q_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="impl"):
        rope_write_kv(qkv, cos, sin, kp, vp, page, offset, num_q_heads=4, num_kv_heads=2, impl="triton")
    row, col = _scales(qkv)
    for bad in ((row[:3], col), (row, col[:-1]), (row,)):
        with pytest.raises(ValueError, match="scales must be"):
            rope_write_kv(qkv, cos, sin, kp, vp, page, offset, num_q_heads=4, num_kv_heads=2, scales=bad)
    assert kernel_supports(32, 8, 128) and kernel_supports(32, 8, 64)
    assert not kernel_supports(28, 4, 128) and not kernel_supports(32, 8, 96) and not kernel_supports(4, 2, 24)
    qkv, cos, sin, kp, vp, page, offset = _inputs(3, 6, 2, 32, 5, 4, jnp.bfloat16)      # 6 q heads
    with pytest.raises(ValueError, match="powers of two"):
        rope_write_kv(qkv, cos, sin, kp, vp, page, offset, num_q_heads=6, num_kv_heads=2, impl="interpret")
    q, nk, _ = rope_write_kv(qkv, cos, sin, kp, vp, page, offset, num_q_heads=6, num_kv_heads=2)   # auto: reference
    assert q.shape == (3, 6, 32) and nk.dtype == kp.dtype
    np.testing.assert_array_equal(np.asarray(to_pages_dtype(jnp.asarray([1e4, -1e4, jnp.nan]), jnp.float8_e4m3fn),
                                             np.float32)[:2], [448, -448])


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("rows,hq,hk,d,dtype", [(16, 32, 8, 128, jnp.float8_e4m3fn),
                                              (2048, 32, 8, 128, jnp.float8_e4m3fn), (8, 4, 2, 16, jnp.bfloat16)])
def test_the_kernel_lowers_to_triton_for_a_gpu(rows, hq, hk, d, dtype, scaled):
    """The kernel as the 8B model calls it (32 q heads, 8 kv heads of 128, fp8 pages) and as the tests' tiny models
    do, with and without ``scales``, lowers through Pallas' Triton lowering on the CPU, so a construct it rejects
    fails here rather than on the device."""
    sds = jax.ShapeDtypeStruct
    pages = sds((hk, 4096, 16, d), dtype)
    width = (hq + 2 * hk) * d
    scales = (sds((rows,), jnp.float32), sds((width,), jnp.float32)) if scaled else None
    f = jax.jit(lambda *a, scales=None: rope_write_kv(*a, num_q_heads=hq, num_kv_heads=hk, impl="kernel",
                                                      scales=scales))
    lowered = f.trace(sds((rows, width), jnp.bfloat16), sds((rows, d), jnp.bfloat16),
                      sds((rows, d), jnp.bfloat16), pages, pages, sds((rows,), jnp.int32),
                      sds((rows,), jnp.int32), scales=scales).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("pages_dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_gpu_the_kernel_on_the_8b_shape(pages_dtype, scaled):
    """On the GPU, jitted as the model calls it, at 16 and 2,048 tokens: the pages' untouched slots and padding
    the same bits; q and the written keys within one rounding of the reference (XLA's compiled reference rotates in
    float32 and rounds once, the kernel rounds each product and the sum as the operations do), the values the same
    bits (a NaN value among them stays NaN); with ``scales`` of the raw product scaled as XLA scales it."""
    for t in (16, 2048):
        args = _inputs(t, 32, 8, 128, num_pages=160, page_size=16, pages_dtype=pages_dtype, seed=t)
        kw = dict(num_q_heads=32, num_kv_heads=8, scales=_scales(args[0], t) if scaled else None)
        got = jax.jit(lambda *a: rope_write_kv(*a, impl="kernel", **kw))(*args)
        want = jax.jit(lambda *a: rope_write_kv(*a, impl="reference", **kw))(*args)
        v = np.asarray(got[2], np.float32)          # (NaN equals NaN here, whatever its bits)
        np.testing.assert_array_equal(v, np.asarray(want[2], np.float32))
        assert np.isnan(v).sum() == 1
        for g, w in ((got[0], want[0]), (got[1], want[1])):
            g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
            # one bf16 rounding of the largest rotated values (|x| ~ 800): 4; an fp8 code at 448 is 32 apart
            np.testing.assert_allclose(g, w, rtol=0.07, atol=4)
            assert (g != w).mean() < 0.05
        untouched = np.ones(args[3].shape[1:3], bool)
        page, offset = np.asarray(args[5]), np.asarray(args[6])
        untouched[page[page < 160], offset[page < 160]] = False
        np.testing.assert_array_equal(_bits(got[1])[:, untouched], _bits(args[3])[:, untouched])
