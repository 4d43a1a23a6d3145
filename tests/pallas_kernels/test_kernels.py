"""The Pallas kernels (decode, ragged prefill) equal the jax.numpy reference.

On CPU they run through Pallas interpret mode (float32); the tests marked
``gpu`` run the compiled kernels in bf16 against the float32 reference.
"""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_decode, ragged_prefill
from pallas_kernels.ragged_paged_attention import (ragged_paged_attention,
                                                   ragged_paged_attention_reference)
from tests.support import constant_filled_buffers


def _batch(rng, seqs, *, num_q_heads, num_kv_heads, head_dim, page_size, dtype, pad_tokens=5,
           spare_pages=9):
    """A packed step: seqs = [(cached tokens, new tokens)], shuffled pages, a padding sequence."""
    max_len = max(c + n for c, n in seqs)
    pages_per_seq = 1 << int(np.ceil(np.log2(-(-max_len // page_size))))
    num_pages = len(seqs) * pages_per_seq + spare_pages
    k_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim))
    v_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim))
    page_table = rng.permutation(num_pages)[:len(seqs) * pages_per_seq].reshape(len(seqs), -1)
    num_tokens = sum(n for _, n in seqs)
    q = rng.standard_normal((num_tokens + pad_tokens, num_q_heads, head_dim))
    kv_lens = np.array([c + n for c, n in seqs] + [0], np.int32)
    cu = np.concatenate([[0], np.cumsum([n for _, n in seqs]), [num_tokens]]).astype(np.int32)
    page_table = np.concatenate([page_table, np.zeros((1, pages_per_seq), np.int64)]).astype(np.int32)
    arrays = [jnp.asarray(x, dtype) for x in (q, k_pages, v_pages)]
    return (*arrays, jnp.asarray(kv_lens), jnp.asarray(page_table), jnp.asarray(cu)), num_tokens


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    # On GPU a float32 dot defaults to TF32 (~1e-3): the float32 reference must not.
    with jax.default_matmul_precision("highest"):
        yield


def _rel(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


# fresh prefill, decodes (incl. length 1), chunks after a cached prefix (150: whole unmasked blocks)
MIXED = [(0, 37), (20, 1), (50, 9), (3, 1), (100, 1), (17, 20), (0, 1), (63, 1), (150, 20)]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,window", [
    (8, 2, 32, None), (4, 4, 16, None), (7, 1, 16, None), (8, 2, 32, 13), (16, 2, 64, None)])
def test_interpreted_kernels_equal_reference_on_mixed_prefill_and_decode(
        num_q_heads, num_kv_heads, head_dim, window):
    rng = np.random.default_rng(num_q_heads + head_dim)
    args, n = _batch(rng, MIXED, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, page_size=16, dtype=jnp.float32)
    kw = dict(sm_scale=head_dim ** -0.5, sliding_window=window)
    out = ragged_paged_attention(*args, impl="interpret", **kw)
    ref = ragged_paged_attention_reference(*args, **kw)
    np.testing.assert_allclose(np.asarray(out[:n]), np.asarray(ref[:n]), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(out[n:]) == 0), "padding rows must be zero"


# MIXED within 8 pages of 16 a sequence: the decode kernel takes one context split (grid_splits)
MIXED_SHORT = [(0, 37), (20, 1), (50, 9), (3, 1), (100, 1), (17, 20), (0, 1), (63, 1), (90, 20)]


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,window", [
    (8, 2, 32, None), (7, 1, 16, None), (8, 2, 32, 13)])
def test_interpreted_kernels_in_one_output_or_merged_equal_reference(
        num_q_heads, num_kv_heads, head_dim, window, in_place):
    rng = np.random.default_rng(num_q_heads + head_dim + 1)
    args, n = _batch(rng, MIXED_SHORT, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, page_size=16, dtype=jnp.float32)
    blocks = paged_decode.decode_block_sizes(head_dim, 16)
    assert paged_decode.grid_splits(args[4].shape[0], num_kv_heads, args[4].shape[1], blocks) == 1
    kw = dict(sm_scale=head_dim ** -0.5, sliding_window=window)
    out = ragged_paged_attention(*args, impl="interpret", in_place=in_place, **kw)
    ref = ragged_paged_attention_reference(*args, **kw)
    np.testing.assert_allclose(np.asarray(out[:n]), np.asarray(ref[:n]), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(out[n:]) == 0), "padding rows must be zero"


def test_interpreted_decode_kernel_stores_only_its_live_queries_rows_into_out():
    # three live decode queries at rows 7, 2, 4 of a [9, H, D] batch, one dead slot (kv_len 0)
    # that points at row 0: every other row of ``out`` keeps what it held
    rng = np.random.default_rng(6)
    args, n = _batch(rng, [(40, 1), (0, 1), (200, 1), (9, 1)], num_q_heads=8, num_kv_heads=2,
                     head_dim=16, page_size=8, dtype=jnp.float32, pad_tokens=5)
    q, k_pages, v_pages, kv_lens, page_table, cu = args
    kv_lens = kv_lens[:4].at[3].set(0)
    rows = jnp.asarray([7, 2, 4, 0], jnp.int32)
    before = jnp.full(q.shape, 7.0, jnp.float32)
    with pytest.raises(ValueError, match="one context split"):
        paged_decode.paged_decode_attention_kernel(
            q, k_pages, v_pages, kv_lens, page_table[:4], q_rows=rows, out=before, sm_scale=0.25,
            interpret=True, num_splits=4)
    out = paged_decode.paged_decode_attention_kernel(
        q, k_pages, v_pages, kv_lens, page_table[:4], q_rows=rows, out=before, sm_scale=0.25,
        interpret=True, num_splits=1)
    ref = paged_decode.paged_decode_attention_reference(
        q[rows[:3]], k_pages, v_pages, kv_lens[:3], page_table[:3], sm_scale=0.25)
    out = np.asarray(out)
    np.testing.assert_allclose(out[[7, 2, 4]], np.asarray(ref), rtol=2e-5, atol=2e-5)
    assert np.all(out[[0, 1, 3, 5, 6, 8]] == 7.0), "rows of no live query must keep their values"


def test_interpreted_prefill_kernel_stores_only_the_chunks_rows_into_out():
    rng = np.random.default_rng(12)
    args, n = _batch(rng, MIXED, num_q_heads=8, num_kv_heads=2, head_dim=32, page_size=16,
                     dtype=jnp.float32)
    cu = np.asarray(args[-1])
    before = jnp.full(args[0].shape, -3.0, jnp.float32)
    out = np.asarray(ragged_prefill.ragged_prefill_attention_kernel(
        *args, sm_scale=32 ** -0.5, interpret=True, min_q_len=1, out=before))
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=32 ** -0.5))
    chunk = np.zeros(out.shape[0], bool)
    for s, (_, q_len) in enumerate(MIXED):
        chunk[cu[s]:cu[s + 1]] = q_len > 1
    np.testing.assert_allclose(out[chunk], ref[chunk], rtol=2e-5, atol=2e-5)
    assert np.all(out[~chunk] == -3.0), "rows of no chunk must keep their values"


def test_kernels_refuse_an_out_of_another_shape():
    rng = np.random.default_rng(1)
    args, n = _batch(rng, [(4, 1)], num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=8,
                     dtype=jnp.float32, pad_tokens=1)
    q, k_pages, v_pages, kv_lens, page_table, cu = args
    with pytest.raises(ValueError, match="out must have q's shape"):
        paged_decode.paged_decode_attention_kernel(
            q, k_pages, v_pages, kv_lens, page_table, q_rows=cu[:-1], out=q[:1], sm_scale=0.25,
            interpret=True, num_splits=1)
    with pytest.raises(ValueError, match="out needs q_rows"):
        paged_decode.paged_decode_attention_kernel(
            q, k_pages, v_pages, kv_lens, page_table, out=q, sm_scale=0.25, interpret=True)
    with pytest.raises(ValueError, match="out must have q's shape"):
        ragged_prefill.ragged_prefill_attention_kernel(*args, sm_scale=0.25, interpret=True, out=q[:1])


def test_interpreted_decode_kernel_splits_long_contexts_and_combines_them():
    rng = np.random.default_rng(3)
    seqs = [(c, 1) for c in (0, 15, 16, 17, 255, 511)]
    args, n = _batch(rng, seqs, num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=8,
                     dtype=jnp.float32, pad_tokens=0)
    q, k_pages, v_pages, kv_lens, page_table, cu = args
    ref = paged_decode.paged_decode_attention_reference(
        q, k_pages, v_pages, kv_lens[:n], page_table[:n], sm_scale=0.25)
    blocks = paged_decode.DecodeBlockSizes(pages_per_block=2, num_warps=4, num_stages=2)
    for splits in (1, 4, 16):
        out = paged_decode.paged_decode_attention_kernel(
            q, k_pages, v_pages, kv_lens[:n], page_table[:n], sm_scale=0.25, interpret=True,
            blocks=blocks, num_splits=splits)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5,
                                   err_msg=f"num_splits={splits}")


def test_live_splits_fill_the_grid_from_the_live_sequences_only():
    lens = jnp.asarray([0, 300, 0, 0, 5, 0, 0, 0], jnp.int32)
    assert int(paged_decode.live_splits(lens, 2, 8, 16)[0]) == 4          # 2 live x 2 heads x 4
    assert int(paged_decode.live_splits(lens[:2], 2, 8, 16)[0]) == 8      # 1 live: the grid's 8
    assert int(paged_decode.live_splits(lens, 2, 8, 1000)[0]) == 8        # never above the grid's
    assert int(paged_decode.live_splits(jnp.full(8, 9, jnp.int32), 2, 8, 16)[0]) == 1
    assert int(paged_decode.live_splits(jnp.zeros(8, jnp.int32), 2, 8, 16)[0]) == 8


@pytest.mark.parametrize("live", [[5], [0, 3, 6], list(range(8))])
def test_interpreted_decode_kernel_in_a_bucket_of_padding_slots_uses_the_live_sequences_splits(live, monkeypatch):
    # 8 sequence slots, the live ones at uneven lengths; the grid is sized for one live sequence
    # (8 splits) and a call uses what its live sequences need (1, 3 or 8 of them here)
    rng = np.random.default_rng(len(live))
    contexts = [511, 17, 300, 255, 16, 1, 90, 433]
    seqs = [(contexts[s] if s in live else 0, 1) for s in range(8)]
    args, n = _batch(rng, seqs, num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=8,
                     dtype=jnp.float32, pad_tokens=0)
    q, k_pages, v_pages, kv_lens, page_table, cu = args
    kv_lens = jnp.asarray([contexts[s] + 1 if s in live else 0 for s in range(8)], jnp.int32)
    blocks = paged_decode.DecodeBlockSizes(pages_per_block=2, num_warps=4, num_stages=2,
                                           min_programs=16, one_live_slots=8)
    want = {1: 8, 3: 3, 8: 1}[len(live)]
    assert int(paged_decode.live_splits(kv_lens, 2, 8, 16)[0]) == want
    # the kernel takes its splits in use from live_splits (any number in use gives the same rows: what it saves is
    # work, so the call itself is checked), traced afresh
    used, real = [], paged_decode.live_splits

    def spy(*a, **k):
        n = real(*a, **k)
        used.append(n)
        return n
    monkeypatch.setattr(paged_decode, "live_splits", spy)
    jax.clear_caches()
    out = paged_decode.paged_decode_attention_kernel(
        q[:8], k_pages, v_pages, kv_lens, page_table[:8], sm_scale=0.25, interpret=True,
        blocks=blocks)
    assert len(used) == 1
    ref = paged_decode.paged_decode_attention_reference(
        q[:8], k_pages, v_pages, kv_lens, page_table[:8], sm_scale=0.25)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    dead = [s for s in range(8) if s not in live]
    assert np.all(np.asarray(out)[dead] == 0), "a padding slot's rows must be zero"


def test_interpreted_decode_kernel_reads_each_query_in_place_by_row():
    rng = np.random.default_rng(5)
    args, n = _batch(rng, [(40, 1), (0, 1), (200, 1)], num_q_heads=4, num_kv_heads=2,
                     head_dim=16, page_size=8, dtype=jnp.float32, pad_tokens=6)
    q, k_pages, v_pages, kv_lens, page_table, cu = args
    rows = jnp.asarray([7, 2, 4], jnp.int32)                    # anywhere in a [9, H, D] array
    out = paged_decode.paged_decode_attention_kernel(
        q, k_pages, v_pages, kv_lens[:3], page_table[:3], q_rows=rows, sm_scale=0.25,
        interpret=True)
    ref = paged_decode.paged_decode_attention_reference(
        q[rows], k_pages, v_pages, kv_lens[:3], page_table[:3], sm_scale=0.25)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("gather", ["pages", "rows"])
def test_interpreted_kernels_gather_keys_by_page_or_by_row_alike(gather):
    # ragged lengths off page multiples, a window, a prefill chunk after a cached prefix
    rng = np.random.default_rng(11)
    args, n = _batch(rng, MIXED, num_q_heads=8, num_kv_heads=2, head_dim=32, page_size=8,
                     dtype=jnp.float32)
    q, k_pages, v_pages, kv_lens, page_table, cu = args
    for window in (None, 13):
        kw = dict(sm_scale=32 ** -0.5, sliding_window=window)
        ref = np.asarray(ragged_paged_attention_reference(*args, **kw))
        prefill = ragged_prefill.ragged_prefill_attention_kernel(
            *args, interpret=True, min_q_len=1,
            blocks=ragged_prefill.PrefillBlockSizes(32, 2, 4, 2, gather=gather), **kw)
        chunk_rows = [r for s in range(len(MIXED)) if MIXED[s][1] > 1
                      for r in range(int(cu[s]), int(cu[s + 1]))]
        np.testing.assert_allclose(np.asarray(prefill)[chunk_rows], ref[chunk_rows],
                                   rtol=2e-5, atol=2e-5, err_msg=f"prefill, window {window}")
        dec = [s for s in range(len(MIXED)) if MIXED[s][1] == 1]
        decode = paged_decode.paged_decode_attention_kernel(
            q[np.asarray(cu)[dec]], k_pages, v_pages, kv_lens[np.asarray(dec)],
            page_table[np.asarray(dec)], interpret=True, num_splits=2,
            blocks=paged_decode.DecodeBlockSizes(2, 4, 2, gather=gather), **kw)
        np.testing.assert_allclose(np.asarray(decode), ref[np.asarray(cu)[dec]],
                                   rtol=2e-5, atol=2e-5, err_msg=f"decode, window {window}")


def test_prefill_work_items_cover_every_chunk_row_once():
    cu = jnp.asarray([0, 5, 6, 40, 41, 41], jnp.int32)      # q_lens 5, 1, 34, 1, 0
    kv = jnp.asarray([5, 9, 70, 3, 0], jnp.int32)
    items = np.asarray(ragged_prefill.work_items(cu, kv, block_q=8, num_items=41 // 8 + 5,
                                                 min_q_len=1))
    covered = [r for s, r0, n, p0 in items for r in range(r0, r0 + n)]
    assert sorted(covered) == list(range(0, 5)) + list(range(6, 40))
    for s, r0, n, p0 in items[items[:, 2] > 0]:
        assert p0 == int(kv[s]) - int(cu[s + 1] - cu[s]) + (r0 - int(cu[s]))


def test_entry_point_rejects_an_unknown_impl():
    rng = np.random.default_rng(0)
    args, _ = _batch(rng, [(0, 3)], num_q_heads=2, num_kv_heads=1, head_dim=8, page_size=4,
                     dtype=jnp.float32)
    with pytest.raises(ValueError, match="impl must be"):
        ragged_paged_attention(*args, sm_scale=1.0, impl="triton")


# ----------------------------------------------------------------------------- GPU

GPU_CASES = [
    ("decode, ragged lengths incl. 1 and maximal", 128, [(0, 1), (16, 1), (4095, 1), (37, 1), (1000, 1)], None),
    ("decode, head_dim 64", 64, [(5, 1), (300, 1), (8191, 1)], None),
    ("decode, sliding window", 128, [(700, 1), (33, 1), (2000, 1)], 256),
    ("mixed prefill chunks and decode", 128, [(0, 2048), (100, 1), (513, 300), (2000, 1), (0, 7)], None),
    ("prefill after a cached prefix, head_dim 64", 64, [(1999, 517), (0, 1), (16, 16)], None),
    ("prefill, sliding window", 128, [(0, 1200), (480, 100)], 333),
    ("qwen-like group of 7", 64, [(0, 300), (77, 1), (500, 20)], None),
    # 41 sequence slots: the decode kernel takes one context split, so in place is in place
    ("40 decodes and a chunk", 128, [(0, 300)] + [(97 * i + 3, 1) for i in range(40)], None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("pages", ["bf16", "fp8"])
@pytest.mark.parametrize("in_place", [False, True], ids=["select", "in_place"])
@pytest.mark.parametrize("name,head_dim,seqs,window", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_kernels_match_reference_in_bf16(name, head_dim, seqs, window, in_place, pages):
    """bf16 queries over bf16 pages, or over fp8 pages (``kv_cache_dtype="fp8"``: widened to float16 as they are
    read), against the float32 reference over the same pages."""
    rng = np.random.default_rng(len(name))
    heads = (14, 2) if "of 7" in name else (32, 8)
    args, n = _batch(rng, seqs, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                     page_size=16, dtype=jnp.bfloat16)
    if pages == "fp8":
        args = _fp8_pages(args)
    if "40 decodes" in name:
        blocks = paged_decode.decode_block_sizes(head_dim, 16, args[1].dtype, args[4].shape[0])
        assert paged_decode.grid_splits(args[4].shape[0], heads[1], args[4].shape[1], blocks) == 1
    kw = dict(sm_scale=head_dim ** -0.5, sliding_window=window)
    out = jax.jit(functools.partial(ragged_paged_attention, impl="kernel", in_place=in_place, **kw))(*args)
    f32 = [a.astype(jnp.float32) for a in args[:3]]
    ref = jax.jit(functools.partial(ragged_paged_attention_reference, **kw))(*f32, *args[3:])
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any()
    assert _rel(out[:n], ref[:n]) < 1e-2
    assert np.all(out[n:] == 0)


@pytest.mark.gpu
def test_gpu_in_place_outputs_of_several_layers_are_not_copies_of_one_zeros_buffer():
    """On the GPU: layers' in-place attention calls (41 slots: one context split) each store into zeros of their own.
    Sharing one (XLA's CSE of identical zeros) made the compiled step copy the shared buffer before each call, a
    read and a write of the whole output a layer; the compiled HLO has no copy of the output's shape."""
    rng = np.random.default_rng(3)
    seqs = [(0, 300)] + [(97 * i + 3, 1) for i in range(40)]
    args, n = _batch(rng, seqs, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16, dtype=jnp.bfloat16)
    q, rest = args[0], args[1:]
    blocks = paged_decode.decode_block_sizes(128, 16, args[1].dtype, args[4].shape[0])
    assert paged_decode.grid_splits(args[4].shape[0], 8, args[4].shape[1], blocks) == 1     # the in-place path
    attend = functools.partial(ragged_paged_attention, impl="kernel", sm_scale=0.1)

    def layers(q, *rest):       # three "layers": each one's query made from the previous one's output
        for _ in range(3):
            q = (attend(q, *rest) * 2).astype(q.dtype)
        return q

    hlo = jax.jit(layers).lower(q, *rest).compile().as_text()
    shape = "bf16[" + ",".join(map(str, q.shape)) + "]"
    copies = [line for line in hlo.splitlines() if " copy(" in line and shape in line.split("copy(")[0]]
    assert hlo.count("paged_decode_attention") >= 3
    assert not copies, copies
    out = np.asarray(jax.jit(layers)(q, *rest).astype(jnp.float32))
    assert np.isfinite(out).all() and np.all(out[n:] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("pages", ["bf16", "fp8"])
@pytest.mark.parametrize("decode_only", [False, True], ids=["mixed", "decode-only"])
def test_gpu_skip_idle_prefill_gives_the_same_step(decode_only, pages):
    """On the GPU: the prefill kernel under its condition (``skip_idle_prefill``) gives the unconditional
    kernels' bits, in a mixed step and in a decode-only one."""
    rng = np.random.default_rng(2)
    seqs = [(c, 1) for c, _ in MIXED] if decode_only else MIXED
    args, n = _batch(rng, seqs, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16, dtype=jnp.bfloat16)
    if pages == "fp8":
        args = _fp8_pages(args)
    want = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.1, impl="kernel"))(*args)
    got = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.1, impl="kernel", skip_idle_prefill=True))(*args)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("products", ["qk", "qk_pv"])
def test_gpu_decode_kernel_fp8_products(products):
    """On the GPU: the decode kernel with ``fp8_products`` (the fp8 matrix instructions) over fp8 pages, 8B's heads,
    41 slots in place and 5 split, within e4m3's rounding of the query of the float32 reference."""
    rng = np.random.default_rng(9)
    for seqs in ([(97 * i + 3, 1) for i in range(41)], [(c, 1) for c in (1, 16, 4095, 37, 1000)]):
        args, n = _batch(rng, seqs, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
                         dtype=jnp.bfloat16, pad_tokens=0)
        q, k, v, lens, pt, cu = _fp8_pages(args)
        blocks = dataclasses.replace(paged_decode.decode_block_sizes(128, 16, k.dtype, len(seqs)),
                                     fp8_products=products)
        out = jax.jit(functools.partial(paged_decode.paged_decode_attention_kernel, sm_scale=128 ** -0.5,
                                        blocks=blocks))(q, k, v, lens, pt)
        f32 = [a.astype(jnp.float32) for a in (q, k, v)]
        ref = ragged_paged_attention_reference(*f32, lens, pt, cu, sm_scale=128 ** -0.5)
        out = np.asarray(out.astype(jnp.float32))
        assert np.isfinite(out).all()
        assert _rel(out[:n], ref[:n]) < 0.05


@pytest.mark.gpu
def test_gpu_entry_point_picks_the_kernels():
    # 'auto' on GPU must be the kernel path: same bits as impl="kernel"
    rng = np.random.default_rng(1)
    args, n = _batch(rng, MIXED, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
                     dtype=jnp.bfloat16)
    auto = ragged_paged_attention(*args, sm_scale=0.1)
    kernel = ragged_paged_attention(*args, sm_scale=0.1, impl="kernel")
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(kernel, np.float32))


# ----------------------------------------------------------------------------- fp8 pages

def _fp8_pages(args):
    """The batch with its K and V pages stored as fp8 (e4m3), as ``kv_cache_dtype="fp8"`` keeps them."""
    q, k, v, *rest = args
    return (q, k.astype(jnp.float8_e4m3fn), v.astype(jnp.float8_e4m3fn), *rest)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,window", [
    (8, 2, 32, None), (7, 1, 16, 13)])
def test_interpreted_kernels_read_fp8_pages_as_the_reference_does(num_q_heads, num_kv_heads, head_dim, window,
                                                                  in_place):
    # the kernels widen each fp8 tile to the query's dtype: the same result as the reference over the same
    # fp8 pages (which widens them to float32), and not the float32 pages' (fp8 rounding is visible)
    rng = np.random.default_rng(num_q_heads + head_dim + 7)
    args32, n = _batch(rng, MIXED_SHORT, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, page_size=16, dtype=jnp.float32)
    args = _fp8_pages(args32)
    assert args[1].dtype == jnp.float8_e4m3fn
    kw = dict(sm_scale=head_dim ** -0.5, sliding_window=window)
    out = ragged_paged_attention(*args, impl="interpret", in_place=in_place, **kw)
    ref = ragged_paged_attention_reference(*args, **kw)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out[:n]), np.asarray(ref[:n]), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(out[n:]) == 0), "padding rows must be zero"
    exact = ragged_paged_attention_reference(*args32, **kw)
    err = _rel(out[:n], exact[:n])
    assert 1e-4 < err < 0.1, err


def test_fp8_pages_are_multiplied_in_float16_with_a_16_bit_query():
    """With fp8 pages and a bf16 query the kernels multiply in float16 (e4m3 widens to it natively; every e4m3
    value is exact in it). Through a float32 output the decode kernel's error against the float32 reference is
    float16's (1.2e-4 here; multiplying in bfloat16 gives 1.1e-3); the ragged entry point agrees with the
    reference within bf16's output rounding. The fp8 decode blocks are the fp8 table's (head_dim 128: 2-page blocks
    over 1 warp) or, for a shape not in it, twice the pages of the bf16 ones; calls of few sequence slots keep the
    bf16 blocks."""
    assert paged_decode.compute_dtype(jnp.bfloat16, jnp.float8_e4m3fn) == jnp.float16
    assert paged_decode.compute_dtype(jnp.float32, jnp.float8_e4m3fn) == jnp.float32
    assert paged_decode.compute_dtype(jnp.bfloat16, jnp.bfloat16) == jnp.bfloat16
    for d in (128, 64, 96):
        b16, b8 = paged_decode.decode_block_sizes(d, 16), paged_decode.decode_block_sizes(d, 16, jnp.float8_e4m3fn)
        if (d, 16) in paged_decode.TUNED_FP8_DECODE_BLOCKS:
            assert b8 == paged_decode.TUNED_FP8_DECODE_BLOCKS[(d, 16)] and (b8.num_warps, b8.pages_per_block) == (1, 2)
        else:
            assert b8.pages_per_block == 2 * b16.pages_per_block
        # a call of few sequence slots keeps the 16-bit blocks (its context splits fill the grid)
        assert paged_decode.decode_block_sizes(d, 16, jnp.float8_e4m3fn, b16.one_live_slots) == b16
        assert paged_decode.decode_block_sizes(d, 16, jnp.float8_e4m3fn, b16.one_live_slots + 1) == b8
    rng = np.random.default_rng(3)
    args, n = _batch(rng, [(c, 1) for c in (40, 100, 7, 63)], num_q_heads=8, num_kv_heads=2, head_dim=32,
                     page_size=16, dtype=jnp.bfloat16, pad_tokens=0)
    q, k, v, lens, pt, cu = _fp8_pages(args)
    kw = dict(sm_scale=32 ** -0.5)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    ref = ragged_paged_attention_reference(*f32, lens, pt, cu, **kw)
    out = paged_decode.paged_decode_attention_kernel(
        q, k, v, lens, pt, interpret=True, num_splits=1, q_rows=jnp.minimum(cu[:-1], n - 1),
        out=jnp.zeros(q.shape, jnp.float32), **kw)
    assert out.dtype == jnp.float32
    assert _rel(out[:n], ref[:n]) < 4e-4
    out = ragged_paged_attention(q, k, v, lens, pt, cu, impl="interpret", **kw)
    assert out.dtype == jnp.bfloat16
    assert _rel(out[:n], ref[:n]) < 1e-2


def test_a_bf16_query_beyond_float16s_range_saturates_instead_of_nan_over_fp8_pages():
    rng = np.random.default_rng(4)
    args, n = _batch(rng, [(30, 1), (0, 9), (20, 1)], num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=16,
                     dtype=jnp.bfloat16)
    q, *rest = _fp8_pages(args)
    q = q.at[0, 0, 0].set(7e4).at[2, 1, 3].set(-1e5)       # finite in bf16, not in float16
    out = ragged_paged_attention(q, *rest, sm_scale=0.25, impl="interpret")
    assert np.isfinite(np.asarray(out, np.float32)).all()


def test_interpreted_kernels_split_long_contexts_over_fp8_pages_with_their_own_blocks():
    """21 decode slots (more than one_live_slots: fp8's 8-page blocks, head_dim 16) over long contexts: the decode
    kernel splits the contexts and combines them, in place or not, as the reference reads the same pages."""
    seqs = [(37 * i + 300, 1) for i in range(20)] + [(0, 12)]
    rng = np.random.default_rng(5)
    args, n = _batch(rng, seqs, num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=16, dtype=jnp.float32)
    args = _fp8_pages(args)
    blocks = paged_decode.decode_block_sizes(16, 16, jnp.float8_e4m3fn, args[4].shape[0])
    assert blocks.pages_per_block == 2 * paged_decode.decode_block_sizes(16, 16).pages_per_block
    assert paged_decode.grid_splits(args[4].shape[0], 2, args[4].shape[1], blocks) > 1
    kw = dict(sm_scale=0.25)
    ref = ragged_paged_attention_reference(*args, **kw)
    for in_place in (True, False):
        out = ragged_paged_attention(*args, impl="interpret", in_place=in_place, **kw)
        np.testing.assert_allclose(np.asarray(out[:n]), np.asarray(ref[:n]), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("products", ["qk", "qk_pv"])
def test_decode_kernel_fp8_products_stay_near_the_widened_ones(products):
    """``DecodeBlockSizes.fp8_products``: the scores (and with "qk_pv" the values' product) from e4m3 operands, the
    query quantized per row. Over fp8 pages with a bf16 query the result stays within e4m3's rounding of the query
    (and of the probabilities) of the widened kernel's, in place and split, persistent or not; a float32 query or
    bf16 pages ignore the option (the same bits as "off"); an unknown value is refused."""
    rng = np.random.default_rng(11)
    args, n = _batch(rng, [(c, 1) for c in (40, 100, 7, 63, 250)], num_q_heads=8, num_kv_heads=2, head_dim=32,
                     page_size=16, dtype=jnp.bfloat16, pad_tokens=0)
    q, k, v, lens, pt, cu = _fp8_pages(args)
    kw = dict(sm_scale=32 ** -0.5, interpret=True, q_rows=jnp.minimum(cu[:-1], n - 1))
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    exact = ragged_paged_attention_reference(*f32, lens, pt, cu, sm_scale=32 ** -0.5)
    base = paged_decode.DecodeBlockSizes(pages_per_block=2, num_warps=1, num_stages=2)
    fp8 = dataclasses.replace(base, fp8_products=products)
    errs = []
    for blocks, splits in ((base, 1), (fp8, 1), (fp8, 3), (dataclasses.replace(fp8, persistent_programs=3), 1)):
        out_kw = dict(out=jnp.zeros(q.shape, jnp.float32)) if splits == 1 else {}
        out = paged_decode.paged_decode_attention_kernel(q, k, v, lens, pt, blocks=blocks, num_splits=splits,
                                                         **out_kw, **kw)
        rows = np.asarray(out[:n])        # one query a sequence: sequence s at row s
        assert np.isfinite(rows).all()
        errs.append(_rel(rows, np.asarray(exact[:n])))
    assert errs[0] < 4e-4                       # widened to float16: float16's error
    # qk_pv is its own product (the probabilities in e4m3 too), not qk's
    outs = {p: np.asarray(paged_decode.paged_decode_attention_kernel(
        q, k, v, lens, pt, blocks=dataclasses.replace(base, fp8_products=p), num_splits=1,
        out=jnp.zeros(q.shape, jnp.float32), **kw)[:n]) for p in ("qk", "qk_pv")}
    assert not np.array_equal(outs["qk"], outs["qk_pv"])
    assert all(errs[0] < e < 0.05 for e in errs[1:]), errs      # e4m3's rounding of q (and p), no more
    assert max(errs[1:]) - min(errs[1:]) < 1e-3, errs     # splits and programs: the same products
    # not applied: a float32 query, or 16-bit pages
    for qq, kk, vv in ((q.astype(jnp.float32), k, v), (q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))):
        a, b = (paged_decode.paged_decode_attention_kernel(qq, kk, vv, lens, pt, blocks=bl, num_splits=1,
                                                           out=jnp.zeros(qq.shape, jnp.float32), **kw)
                for bl in (base, fp8))
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="fp8_products"):
        paged_decode.paged_decode_attention_kernel(q, k, v, lens, pt, num_splits=1,
                                                   blocks=dataclasses.replace(base, fp8_products="pv"), **kw)
    # what the fp8 instruction's depth (32) allows: qk_pv over 16-token blocks is qk, a head_dim of 16 neither
    bf16, e4m3 = jnp.bfloat16, jnp.float8_e4m3fn
    assert paged_decode.fp8_products_for("qk_pv", bf16, e4m3, 128, 32) == "qk_pv"
    assert paged_decode.fp8_products_for("qk_pv", bf16, e4m3, 128, 16) == "qk"
    assert paged_decode.fp8_products_for("qk", bf16, e4m3, 16, 64) == "off"
    assert paged_decode.fp8_products_for("qk", jnp.float32, e4m3, 128, 64) == "off"


# ----------------------------------------------------------------------------- persistent decode programs

def _in_place_decode_case(rng, dtype):
    """9 slots, 2 kv heads, live and empty slots interleaved, queries at scattered rows of a 12-row q."""
    num_pages, pages_per_seq = 80, 8
    k = jnp.asarray(rng.standard_normal((2, num_pages, 16, 32)), jnp.float32).astype(dtype)
    v = jnp.asarray(rng.standard_normal((2, num_pages, 16, 32)), jnp.float32).astype(dtype)
    q = jnp.asarray(rng.standard_normal((12, 8, 32)), jnp.float32)
    lens = jnp.asarray([100, 1, 0, 128, 37, 0, 0, 5, 77], jnp.int32)
    pt = jnp.asarray(rng.permutation(num_pages)[:9 * pages_per_seq].reshape(9, pages_per_seq), jnp.int32)
    rows = jnp.asarray([3, 0, 11, 5, 1, 2, 4, 7, 9], jnp.int32)
    return q, k, v, lens, pt, rows


@pytest.mark.parametrize("pages", ["f32", "fp8"])
@pytest.mark.parametrize("window", [None, 40])
def test_interpreted_decode_kernel_with_persistent_programs_stores_what_a_program_an_item_does(pages, window):
    """``persistent_programs``: the in-place kernel's programs loop over the (sequence, kv head) items. With 1, 5 or
    more programs than the 18 items the stored rows equal the grid of a program an item, bit for bit; rows of
    empty slots and rows no query owns keep what ``out`` held."""
    rng = np.random.default_rng(21)
    q, k, v, lens, pt, rows = _in_place_decode_case(rng, jnp.float32 if pages == "f32" else jnp.float8_e4m3fn)
    out = jnp.full(q.shape, 7.0, jnp.float32)
    kw = dict(sm_scale=32 ** -0.5, interpret=True, q_rows=rows, out=out, num_splits=1, sliding_window=window)
    grid = paged_decode.paged_decode_attention_kernel(q, k, v, lens, pt, blocks=paged_decode.DecodeBlockSizes(4, 4, 3),
                                                      **kw)
    live_rows = np.asarray(rows)[np.asarray(lens) > 0]
    untouched = np.setdiff1d(np.arange(q.shape[0]), live_rows)
    assert np.all(np.asarray(grid)[untouched] == 7.0) and not np.any(np.asarray(grid)[live_rows] == 7.0)
    for programs in (1, 5, 64):
        blocks = paged_decode.DecodeBlockSizes(4, 4, 3, persistent_programs=programs)
        got = paged_decode.paged_decode_attention_kernel(q, k, v, lens, pt, blocks=blocks, **kw)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(grid))


def test_persistent_programs_need_keys_gathered_by_row():
    rng = np.random.default_rng(22)
    q, k, v, lens, pt, rows = _in_place_decode_case(rng, jnp.float32)
    with pytest.raises(ValueError, match="gather='rows'"):
        paged_decode.paged_decode_attention_kernel(
            q, k, v, lens, pt, sm_scale=0.2, interpret=True, q_rows=rows, out=jnp.zeros_like(q), num_splits=1,
            blocks=paged_decode.DecodeBlockSizes(4, 4, 3, gather="pages", persistent_programs=4))


# ----------------------------------------------------------------------------- balanced decode chunks

def _chunks_of(lens, page_size, pages_per_block, chunk, max_chunks):
    """The chunks each sequence of a balanced call runs (the kernel's rule, in numpy: the tests use it to check that
    their cases split what they mean to split)."""
    blocks = -(-(-(-np.asarray(lens) // page_size)) // pages_per_block)
    return -(-blocks // np.maximum(np.maximum(chunk, -(-blocks // max_chunks)), 1))


def test_balance_chunk_blocks_is_the_live_sequences_mean_at_least_the_minimum():
    lens = jnp.asarray([100, 0, 1, 0, 300], jnp.int32)        # blocks of 2 pages of 16: 4, 1, 10 -> mean 5
    assert int(paged_decode.balance_chunk_blocks(lens, 16, 2, 1)[0]) == 5
    assert int(paged_decode.balance_chunk_blocks(lens, 16, 2, 8)[0]) == 8
    assert int(paged_decode.balance_chunk_blocks(jnp.zeros(4, jnp.int32), 16, 2, 1)[0]) == 1


def test_balanced_calls_are_in_place_calls_of_few_enough_slots_without_a_window_or_persistent_programs():
    b = paged_decode.DecodeBlockSizes(2, 1, 6, balance_chunks=2, balance_max_slots=512)
    assert paged_decode.balances(b, 512, None)
    assert not paged_decode.balances(b, 513, None)
    assert not paged_decode.balances(b, 64, 4096)
    assert not paged_decode.balances(dataclasses.replace(b, persistent_programs=132), 64, None)
    assert not paged_decode.balances(dataclasses.replace(b, balance_chunks=1), 64, None)
    # off in the tuned blocks (slower in the engine's run on an H100)
    assert paged_decode.decode_block_sizes(128, 16, jnp.float8_e4m3fn, 256).balance_chunks == 0
    assert paged_decode.decode_block_sizes(128, 16, jnp.bfloat16, 256).balance_chunks == 0


@pytest.mark.parametrize("pages", ["f32", "fp8"])
def test_interpreted_balanced_decode_kernel_stores_what_a_program_a_sequence_does(pages):
    """``balance_chunks``: contexts longer than the call's mean split into up to 2, 3 or 4 chunks (one sequence into
    4, others into 2 or 3, short ones whole), the last chunk to finish merging them: the stored rows equal one
    program a (sequence, kv head) to float32 rounding; rows of empty slots and rows no query owns keep what ``out``
    held."""
    rng = np.random.default_rng(25)
    dtype = jnp.float32 if pages == "f32" else jnp.float8_e4m3fn
    num_pages, pages_per_seq = 400, 32
    k, v = (jnp.asarray(rng.standard_normal((2, num_pages, 16, 32)), jnp.float32).astype(dtype) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((14, 8, 32)), jnp.float32)
    lens = jnp.asarray([500, 1, 0, 300, 40, 0, 0, 5, 17, 33, 20, 12], jnp.int32)
    pt = jnp.asarray(rng.permutation(num_pages)[:12 * pages_per_seq].reshape(12, pages_per_seq), jnp.int32)
    rows = jnp.asarray([3, 0, 13, 5, 1, 2, 4, 7, 9, 6, 11, 12], jnp.int32)
    out = jnp.full(q.shape, 7.0, jnp.float32)
    kw = dict(sm_scale=32 ** -0.5, interpret=True, q_rows=rows, out=out, num_splits=1)
    whole = paged_decode.paged_decode_attention_kernel(q, k, v, lens, pt, blocks=paged_decode.DecodeBlockSizes(1, 4, 3),
                                                       **kw)
    live_rows = np.asarray(rows)[np.asarray(lens) > 0]
    untouched = np.setdiff1d(np.arange(q.shape[0]), live_rows)
    chunk = int(paged_decode.balance_chunk_blocks(lens, 16, 1, 1)[0])
    assert chunk == 8                      # 64 blocks over 9 live sequences
    for max_chunks in (2, 3, 4):
        blocks = paged_decode.DecodeBlockSizes(1, 4, 3, balance_chunks=max_chunks, balance_min_blocks=1)
        n = _chunks_of(lens, 16, 1, chunk, max_chunks)
        assert n.max() == max_chunks and 1 in n and (n > 1).sum() == 2
        got = paged_decode.paged_decode_attention_kernel(q, k, v, lens, pt, blocks=blocks, **kw)
        assert np.all(np.asarray(got)[untouched] == 7.0)
        np.testing.assert_allclose(np.asarray(got), np.asarray(whole), rtol=1e-5, atol=1e-6)


def _kernel_blocks(monkeypatch) -> list:
    """[(kind, blocks)] of each kernel the entry point calls from now on ("decode" / "prefill"): what reaches the
    kernels themselves (the same rows come out whatever their programs and chunks)."""
    entry = importlib.import_module("pallas_kernels.ragged_paged_attention")
    seen = []
    decode, prefill = entry.paged_decode_attention_kernel, entry.ragged_prefill_attention_kernel

    def spy_decode(*a, blocks, **k):
        seen.append(("decode", blocks))
        return decode(*a, blocks=blocks, **k)

    def spy_prefill(*a, blocks, **k):
        seen.append(("prefill", blocks))
        return prefill(*a, blocks=blocks, **k)
    monkeypatch.setattr(entry, "paged_decode_attention_kernel", spy_decode)
    monkeypatch.setattr(entry, "ragged_prefill_attention_kernel", spy_prefill)
    return seen


def test_interpreted_ragged_entry_point_with_decode_chunks_equals_the_reference(monkeypatch):
    """The entry point's ``decode_chunks`` (the decode kernel's ``balance_chunks``) on a mixed step whose decode
    kernel runs in place with long contexts split (the blocks patched to one split and 1-block chunks)."""
    entry = importlib.import_module("pallas_kernels.ragged_paged_attention")
    monkeypatch.setattr(entry, "decode_block_sizes",
                        lambda *a: paged_decode.DecodeBlockSizes(1, 4, 3, min_programs=1, balance_min_blocks=1))
    rng = np.random.default_rng(26)
    seqs = MIXED_SHORT + [(300, 1), (5, 1), (700, 1)]
    args, n = _batch(rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=32, page_size=16, dtype=jnp.float32)
    lens, slots = args[3], args[4].shape[0]
    assert paged_decode.grid_splits(slots, 2, args[4].shape[1], entry.decode_block_sizes()) == 1
    decoding = np.asarray(lens) * (np.diff(np.asarray(args[5])) == 1)
    kw = dict(sm_scale=32 ** -0.5)
    ref = ragged_paged_attention_reference(*args, **kw)
    seen = _kernel_blocks(monkeypatch)
    for chunks in (2, 4):
        chunk = int(paged_decode.balance_chunk_blocks(jnp.asarray(decoding), 16, 1, 1)[0])
        assert _chunks_of(decoding, 16, 1, chunk, chunks).max() == chunks
        seen.clear()
        got = ragged_paged_attention(*args, impl="interpret", decode_chunks=chunks, **kw)
        assert [b.balance_chunks for kind, b in seen if kind == "decode"] == [chunks]
        np.testing.assert_allclose(np.asarray(got[:n]), np.asarray(ref[:n]), rtol=2e-5, atol=2e-5)
        assert np.all(np.asarray(got[n:]) == 0)


@pytest.mark.parametrize("pages", ["bf16", "fp8"])
def test_the_balanced_decode_kernel_lowers_to_triton_for_a_gpu(pages):
    """The balanced grid (its atomic count, barrier and volatile loads) through Pallas' Triton lowering on the CPU:
    one kernel, whose operands and results hold the (256 slots x 8 kv heads) counts and the 3 chunks' partials, which
    the grid of a program a sequence does not have."""
    dtype = jnp.float8_e4m3fn if pages == "fp8" else jnp.bfloat16
    sds = jax.ShapeDtypeStruct
    args = (sds((2048, 32, 128), jnp.bfloat16), sds((8, 4096, 16, 128), dtype), sds((8, 4096, 16, 128), dtype),
            sds((256,), jnp.int32), sds((256, 128), jnp.int32))
    kw = dict(q_rows=sds((256,), jnp.int32), out=sds((2048, 32, 128), jnp.bfloat16))
    texts = {}
    for chunks in (0, 3):
        blocks = dataclasses.replace(paged_decode.decode_block_sizes(128, 16, dtype, 256), balance_chunks=chunks)
        f = jax.jit(functools.partial(paged_decode.paged_decode_attention_kernel, sm_scale=0.088, blocks=blocks))
        texts[chunks] = f.trace(*args, **kw).lower(lowering_platforms=("cuda",)).as_text()
        assert texts[chunks].count("__gpu$xla.gpu.triton") == 1
        assert constant_filled_buffers(f.trace(*args, **kw).jaxpr) == []
    for balanced_only in ("tensor<2048xi32>", "tensor<256x3x8x16x128xf32>"):
        assert balanced_only in texts[3] and balanced_only not in texts[0]


@pytest.mark.gpu
@pytest.mark.parametrize("pages", ["bf16", "fp8"])
def test_gpu_balanced_decode_kernel(pages):
    """On the GPU the balanced grid (2-4 chunks a long context, merged by the last to finish through an atomic
    count) stores what a program a (sequence, kv head) stores, to bf16 rounding, and the same bits call after call
    (the merge runs in chunk order): 200 live decodes of drawn contexts among 256 slots."""
    rng = np.random.default_rng(27)
    seqs = [(int(c), 1) for c in rng.integers(16, 1400, 200)]
    args, n = _batch(rng, seqs, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16, dtype=jnp.bfloat16)
    if pages == "fp8":
        args = _fp8_pages(args)
    q, k, v, lens, pt, cu = args
    lens = jnp.zeros(256, jnp.int32).at[:lens.shape[0]].set(lens)
    pt = jnp.zeros((256, pt.shape[1]), jnp.int32).at[:pt.shape[0]].set(pt)
    rows = jnp.zeros(256, jnp.int32).at[:cu.shape[0] - 1].set(jnp.minimum(cu[:-1], n - 1))
    kw = dict(sm_scale=128 ** -0.5, q_rows=rows, out=jnp.zeros_like(q), num_splits=1)
    base = dataclasses.replace(paged_decode.decode_block_sizes(128, 16, k.dtype, 256), balance_chunks=0)
    whole = np.asarray(paged_decode.paged_decode_attention_kernel(q, k, v, lens, pt, blocks=base, **kw), np.float32)
    for chunks in (2, 4):
        blocks = dataclasses.replace(base, balance_chunks=chunks)
        first = np.asarray(paged_decode.paged_decode_attention_kernel(q, k, v, lens, pt, blocks=blocks, **kw),
                           np.float32)
        np.testing.assert_allclose(first, whole, rtol=2e-2, atol=2e-2)
        assert _rel(first, whole) < 1e-2
        for _ in range(3):
            again = paged_decode.paged_decode_attention_kernel(q, k, v, lens, pt, blocks=blocks, **kw)
            np.testing.assert_array_equal(np.asarray(again, np.float32), first)


def test_interpreted_ragged_entry_point_with_attention_programs_equals_the_reference(monkeypatch):
    seen = _kernel_blocks(monkeypatch)
    rng = np.random.default_rng(23)
    args, n = _batch(rng, MIXED_SHORT, num_q_heads=8, num_kv_heads=2, head_dim=32, page_size=16, dtype=jnp.float32)
    # one context split: the in-place path, where both kernels take the programs
    blocks = paged_decode.decode_block_sizes(32, 16, args[1].dtype, args[4].shape[0])
    assert paged_decode.grid_splits(args[4].shape[0], 2, args[4].shape[1], blocks) == 1
    kw = dict(sm_scale=32 ** -0.5)
    ref = ragged_paged_attention_reference(*args, **kw)
    got = ragged_paged_attention(*args, impl="interpret", in_place=True, attention_programs=7, **kw)
    assert [(kind, b.persistent_programs) for kind, b in seen] == [("decode", 7), ("prefill", 7)]
    np.testing.assert_allclose(np.asarray(got[:n]), np.asarray(ref[:n]), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(got[n:]) == 0)
    seen.clear()
    # context splits (MIXED's longer contexts): the decode kernel's splits merged into rows by their kernel, the
    # prefill kernel's persistent programs storing into them
    args, n = _batch(rng, MIXED, num_q_heads=8, num_kv_heads=2, head_dim=32, page_size=16, dtype=jnp.float32)
    assert paged_decode.grid_splits(args[4].shape[0], 2, args[4].shape[1], blocks) > 1
    ref = ragged_paged_attention_reference(*args, **kw)
    got = ragged_paged_attention(*args, impl="interpret", in_place=True, attention_programs=7, **kw)
    # the decode kernel a program a (sequence, kv head, split), its splits merged; the prefill kernel's programs
    assert [(kind, b.persistent_programs) for kind, b in seen] == [("decode", 0), ("prefill", 7)]
    np.testing.assert_allclose(np.asarray(got[:n]), np.asarray(ref[:n]), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(got[n:]) == 0)


@pytest.mark.parametrize("mix", [MIXED_SHORT, MIXED])
def test_prefill_programs_go_to_the_prefill_kernel_alone(mix, monkeypatch):
    """``prefill_programs``: the prefill kernel's persistent programs with the decode kernel a program an item (and
    None: both as ``attention_programs``); the same rows as the reference, in interpret mode."""
    import importlib
    rpa = importlib.import_module("pallas_kernels.ragged_paged_attention")   # the module, not the package's function
    seen = []
    decode_part, prefill_part = rpa.decode_part, rpa.prefill_part

    def spy_decode(*a, attention_programs=0, **k):
        seen.append(("decode", attention_programs))
        return decode_part(*a, attention_programs=attention_programs, **k)

    def spy_prefill(*a, attention_programs=0, **k):
        seen.append(("prefill", attention_programs))
        return prefill_part(*a, attention_programs=attention_programs, **k)
    monkeypatch.setattr(rpa, "decode_part", spy_decode)
    monkeypatch.setattr(rpa, "prefill_part", spy_prefill)
    kernels = _kernel_blocks(monkeypatch)
    rng = np.random.default_rng(29)
    args, n = _batch(rng, mix, num_q_heads=8, num_kv_heads=2, head_dim=32, page_size=16, dtype=jnp.float32)
    kw = dict(sm_scale=32 ** -0.5)
    ref = ragged_paged_attention_reference(*args, **kw)
    for programs, prefill_programs, want in ((0, 5, [("decode", 0), ("prefill", 5)]),
                                             (3, None, [("decode", 3), ("prefill", 3)]),
                                             (3, 0, [("decode", 3), ("prefill", 0)])):
        seen.clear()
        kernels.clear()
        got = ragged_paged_attention(*args, impl="interpret", in_place=True, attention_programs=programs,
                                     prefill_programs=prefill_programs, **kw)
        assert seen == want
        # and into the kernels: the prefill kernel's programs; the decode kernel's where it has one split (MIXED's
        # long contexts are split: a program an item and split there)
        decode_programs = want[0][1] if mix is MIXED_SHORT else 0
        assert [(kind, b.persistent_programs) for kind, b in kernels] == [("decode", decode_programs), want[1]]
        np.testing.assert_allclose(np.asarray(got[:n]), np.asarray(ref[:n]), rtol=2e-5, atol=2e-5)
        assert np.all(np.asarray(got[n:]) == 0)


@pytest.mark.parametrize("splits,group,num_seqs", [(4, 4, 5), (32, 7, 3), (16, 1, 12)])
def test_the_split_merge_kernel_writes_what_combine_splits_gives_at_each_live_row(splits, group, num_seqs):
    """``merge_splits_into_rows`` (interpret mode) against ``combine_splits`` scattered to the live sequences' rows:
    splits that saw nothing (l = 0) hold NaN garbage that must not leak, a dead slot (kv_len 0) points at a live
    row and at row 0, rows no live query owns are 0; 32 splits take the loop over chunks of MERGE_UNROLL; a group of
    7 (padded to 8 rows) and of 1."""
    rng = np.random.default_rng(splits)
    k, r, d, t = 2, 16, 32, 16
    o = rng.standard_normal((num_seqs, splits, k, r, d)).astype(np.float32)
    m = rng.standard_normal((num_seqs, splits, k, r)).astype(np.float32) * 3
    l = rng.uniform(0.5, 4, (num_seqs, splits, k, r)).astype(np.float32)
    empty = rng.random((num_seqs, splits, 1, 1)) < 0.3
    empty[:, 0] = False
    l = np.where(empty, 0.0, l).astype(np.float32)
    o = np.where(empty[..., None], np.nan, o).astype(np.float32)
    m = np.where(empty, paged_decode._MASK_VALUE, m).astype(np.float32)
    kv_lens = np.full(num_seqs, 50, np.int32)
    q_rows = rng.permutation(t)[:num_seqs].astype(np.int32)
    kv_lens[1] = 0
    q_rows[1] = q_rows[0]                          # a dead slot on a live sequence's row
    got = paged_decode.merge_splits_into_rows(jnp.asarray(o), jnp.asarray(m), jnp.asarray(l), jnp.asarray(kv_lens),
                                              jnp.asarray(q_rows), num_rows=t, group=group, dtype=jnp.float32,
                                              interpret=True)
    merged = np.asarray(paged_decode.combine_splits(jnp.asarray(o[..., :group, :]), jnp.asarray(m[..., :group]),
                                                    jnp.asarray(l[..., :group])))       # [S, K, G, D]
    want = np.zeros((t, k * group, d), np.float32)
    for seq in range(num_seqs):
        if kv_lens[seq] > 0:
            want[q_rows[seq]] = merged[seq].reshape(k * group, d)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # and as Triton lowers it (the chunks' loop at 32 splits, the padded group of 7)
    sds = jax.ShapeDtypeStruct
    f = jax.jit(functools.partial(paged_decode.merge_splits_into_rows, num_rows=t, group=group, dtype=jnp.bfloat16))
    lowered = f.trace(sds(o.shape, jnp.float32), sds(m.shape, jnp.float32), sds(l.shape, jnp.float32),
                      sds((num_seqs,), jnp.int32), sds((num_seqs,), jnp.int32)).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()
    with pytest.raises(ValueError, match="multiples of 16"):       # 24 splits: a chunk of 16 and 8 left over
        paged_decode.merge_splits_into_rows(jnp.zeros((2, 24, 2, 16, 32)), jnp.zeros((2, 24, 2, 16)),
                                            jnp.zeros((2, 24, 2, 16)), jnp.ones((2,), jnp.int32),
                                            jnp.arange(2, dtype=jnp.int32), num_rows=4, group=4, dtype=jnp.float32)
    with pytest.raises(ValueError, match="merged_rows"):
        paged_decode.paged_decode_attention_kernel(
            jnp.zeros((4, 8, 32)), jnp.zeros((2, 8, 16, 32)), jnp.zeros((2, 8, 16, 32)), jnp.ones((2,), jnp.int32),
            jnp.zeros((2, 4), jnp.int32), sm_scale=0.1, q_rows=jnp.zeros((2,), jnp.int32), merged_rows=True,
            num_splits=1, interpret=True)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("seqs", [MIXED_SHORT, [(c, 1) for c, _ in MIXED_SHORT], MIXED, [(c, 1) for c, _ in MIXED]],
                         ids=["mixed", "decode-only", "mixed-split", "decode-only-split"])
def test_skip_idle_prefill_gives_the_same_step(seqs, in_place):
    """``skip_idle_prefill``: the prefill kernel under a device-side condition (taken in a step with a chunk of more
    than one token, skipped in a decode-only one) gives the result the unconditional kernels give, in one output
    or merged (interpret mode); MIXED's longer contexts take context splits (in place: the split merge kernel's
    rows, into which the conditional prefill kernel stores)."""
    rng = np.random.default_rng(24)
    args, n = _batch(rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=32, page_size=16, dtype=jnp.float32)
    blocks = paged_decode.decode_block_sizes(32, 16, args[1].dtype, args[4].shape[0])
    splits = paged_decode.grid_splits(args[4].shape[0], 2, args[4].shape[1], blocks)
    assert (splits > 1) == (len(seqs) == len(MIXED) and seqs[-1][0] == MIXED[-1][0])
    kw = dict(sm_scale=32 ** -0.5, impl="interpret", in_place=in_place)
    want = ragged_paged_attention(*args, **kw)
    got = jax.jit(functools.partial(ragged_paged_attention, skip_idle_prefill=True, **kw))(*args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ref = ragged_paged_attention_reference(*args, sm_scale=32 ** -0.5)
    np.testing.assert_allclose(np.asarray(got[:n]), np.asarray(ref[:n]), rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("pages", ["bf16", "fp8"])
def test_gpu_decode_kernel_with_persistent_programs(pages):
    """On the GPU the persistent grid stores what a program an item stores (the same loop a (sequence, head)):
    40 live decodes spread over a bucket's 1,024 sequence slots, the rest empty."""
    rng = np.random.default_rng(24)
    seqs = [(97 * i + 3, 1) for i in range(40)]
    args, n = _batch(rng, seqs, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16, dtype=jnp.bfloat16)
    if pages == "fp8":
        args = _fp8_pages(args)
    q, k, v, lens, pt, cu = args
    # the live slots scattered among 1,024
    slots = np.sort(rng.choice(1024, lens.shape[0], replace=False))
    lens = jnp.zeros(1024, jnp.int32).at[slots].set(lens)
    pt = jnp.zeros((1024, pt.shape[1]), jnp.int32).at[slots].set(pt)
    rows = jnp.zeros(1024, jnp.int32).at[slots].set(jnp.minimum(cu[:-1], n - 1))
    kw = dict(sm_scale=128 ** -0.5, q_rows=rows, out=jnp.zeros_like(q), num_splits=1)
    grid = paged_decode.paged_decode_attention_kernel(q, k, v, lens, pt, **kw)
    base = paged_decode.decode_block_sizes(128, 16, k.dtype, lens.shape[0])
    for programs in (132, 264, 1000):
        got = paged_decode.paged_decode_attention_kernel(
            q, k, v, lens, pt, blocks=dataclasses.replace(base, persistent_programs=programs), **kw)
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(grid.astype(jnp.float32)))


@pytest.mark.parametrize("window", [None, 13])
def test_interpreted_prefill_kernel_with_persistent_programs_stores_what_a_program_an_item_does(window):
    """``PrefillBlockSizes.persistent_programs``: programs a kv head looping over the step's real items (listed
    first) store the same rows as a program an item, bit for bit, with fewer programs than items or more; rows the
    kernel skips (decode tokens, padding) keep what ``out`` held."""
    rng = np.random.default_rng(25)
    q, k, v, lens, pt, cu = _batch(rng, MIXED, num_q_heads=8, num_kv_heads=2, head_dim=32, page_size=16,
                                   dtype=jnp.float32)[0]
    kw = dict(sm_scale=32 ** -0.5, interpret=True, sliding_window=window, min_q_len=1,
              out=jnp.full(q.shape, 5.0, jnp.float32))
    grid = ragged_prefill.ragged_prefill_attention_kernel(
        q, k, v, lens, pt, cu, blocks=ragged_prefill.PrefillBlockSizes(32, 4, 4, 3), **kw)
    skipped = np.asarray(grid == 5.0).all(axis=(1, 2))
    assert skipped.sum() == sum(n == 1 for _, n in MIXED) + 5          # decode tokens and the 5 padding rows
    for programs in (2, 7, 1000):
        got = ragged_prefill.ragged_prefill_attention_kernel(
            q, k, v, lens, pt, cu, blocks=ragged_prefill.PrefillBlockSizes(32, 4, 4, 3, persistent_programs=programs),
            **kw)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(grid))
    with pytest.raises(ValueError, match="gather='rows'"):
        ragged_prefill.ragged_prefill_attention_kernel(
            q, k, v, lens, pt, cu, blocks=ragged_prefill.PrefillBlockSizes(32, 4, 4, 3, "pages", persistent_programs=4),
            **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("pages", ["bf16", "fp8"])
@pytest.mark.parametrize("name,head_dim,seqs,window", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_entry_point_with_attention_programs_equals_a_program_an_item(name, head_dim, seqs, window, pages):
    rng = np.random.default_rng(len(name) + 1)
    heads = (14, 2) if "of 7" in name else (32, 8)
    args, n = _batch(rng, seqs, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                     page_size=16, dtype=jnp.bfloat16)
    if pages == "fp8":
        args = _fp8_pages(args)
    kw = dict(sm_scale=head_dim ** -0.5, sliding_window=window, impl="kernel")
    want = jax.jit(functools.partial(ragged_paged_attention, **kw))(*args)
    for programs in (132, 528):
        got = jax.jit(functools.partial(ragged_paged_attention, attention_programs=programs, **kw))(*args)
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    # the prefill kernel's programs alone (prefill_programs), the decode kernel a program an item
    got = jax.jit(functools.partial(ragged_paged_attention, prefill_programs=1056, **kw))(*args)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


@pytest.mark.parametrize("pages", ["bf16", "fp8"])
@pytest.mark.parametrize("programs", [0, 1056])
@pytest.mark.parametrize("slots,window,in_place", [(1024, None, True), (16, None, True), (1024, 256, True),
                                                   (64, None, False)])
def test_the_kernels_lower_to_triton_for_a_gpu_at_the_engines_shapes(pages, programs, slots, window, in_place):
    """Pallas' Triton lowering runs on the CPU too (``lower(lowering_platforms=("cuda",))``): every kernel
    configuration the engine can ask for -- both page dtypes, persistent programs or not, a bucket of many slots
    (one context split, in place) or few (splits and their merge), a sliding window -- must lower, so a construct
    Triton's lowering rejects (which interpret mode accepts) fails here rather than on the device."""
    dtype = jnp.float8_e4m3fn if pages == "fp8" else jnp.bfloat16
    sds = jax.ShapeDtypeStruct
    args = (sds((2048, 32, 128), jnp.bfloat16), sds((8, 4096, 16, 128), dtype), sds((8, 4096, 16, 128), dtype),
            sds((slots,), jnp.int32), sds((slots, 128), jnp.int32), sds((slots + 1,), jnp.int32))
    f = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.088, sliding_window=window, impl="kernel",
                                  in_place=in_place, attention_programs=programs))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # the decode kernel and the prefill kernel; in place with few slots (context splits) the splits' merge kernel
    kernels = 3 if in_place and slots == 16 else 2
    assert text.count("__gpu$xla.gpu.triton") == kernels
    assert ("merge_decode_splits" in text) == (kernels == 3)
    # skip_idle_prefill: the same kernels, the prefill one inside a conditional
    skip = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.088, sliding_window=window, impl="kernel",
                                     in_place=in_place, attention_programs=programs, skip_idle_prefill=True))
    text_skip = skip.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text_skip.count("__gpu$xla.gpu.triton") == kernels and "stablehlo.case" in text_skip
    assert "stablehlo.case" not in text
    # no buffer filled with a constant (a memset on the GPU, which ends a CUDA graph or keeps the skip's
    # conditional out of it): the in-place output's zeros and the skipped branch's are kernels (kernel_zeros)
    assert constant_filled_buffers(f.trace(*args).jaxpr) == []
    assert constant_filled_buffers(skip.trace(*args).jaxpr) == []
