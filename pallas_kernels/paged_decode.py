"""Decode paged attention: one query token per sequence over its KV pages (Pallas, GPU).

Each program of the kernel serves one (sequence, kv head, context split): it
loads the ``G = num_q_heads // num_kv_heads`` query heads of that kv head once
(padded to 16 rows, the smallest tile of the GPU's matrix instructions) and
streams the sequence's pages ``pages_per_block`` at a time, gathering them
straight out of the cache (no copy of the cache), with an online softmax in
float32. Keys are gathered by row (``gather="rows"``, the tuned choice): each
key token of a block reads its page id from the page table and the
``[tokens, head_dim]`` tile is loaded from the ``[pages * page_size, head_dim]``
view of one kv head's pages, so the loaded tile feeds the matrix products with
no reshape (gathering ``[pages, page_size, head_dim]`` by page id and
reshaping it, ``gather="pages"``, ran 1.4-1.6x slower on an H200). Long
contexts are split over ``num_splits`` programs whose partial results (``o``,
running max ``m``, running sum ``l``) are merged by a numerically stable
log-sum-exp combine after the kernel: ``merge_splits_into_rows``, a second
kernel writing q-shaped rows (the entry point in place), or ``combine_splits``
(``jax.numpy``).

KV layout (jaxdyn/kv/cache.py): ``k_pages, v_pages: [num_kv_heads, num_pages,
page_size, head_dim]``; one (head, page) tile is one contiguous run.

Backend: Pallas on Triton, not Mosaic GPU. The kernel's inner loop is a
data-dependent gather (page ids read from the page table, 16-token pages) and
its matrix products have as few rows as the query group (1-8 heads, padded to
16). Triton's pointer loads express the page gather as one pipelined load per
block and its ``dot`` takes 16-row tiles; Mosaic GPU in jax 0.10/0.11 moves
data with TMA tile copies (one descriptor copy and barrier per 16-token page)
and multiplies with ``wgmma`` on 64-row warpgroup tiles, so a decode group
would be padded 4-16x and every page would cost a separate asynchronous copy.
The kernel also has to run in Pallas interpret mode on CPU CI, which the
Triton-style ``pallas_call`` supports directly.

``paged_decode_attention`` is the entry point: the kernel on GPU, Pallas
interpret mode or the ``jax.numpy`` reference elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jax.experimental.pallas import triton as pltriton   # Triton backend: loads, stores, options

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_MIN_ROWS = 16          # smallest M of a Triton dot tile
MERGE_WARPS = 4         # a program of ``merge_splits_into_rows`` (a row's kv head: C x G x D float32 partials)
MERGE_UNROLL = 16       # context splits ``merge_splits_into_rows`` loads at once (more: a loop over such chunks)


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    pages_per_block: int   # pages gathered per loop iteration
    num_warps: int
    num_stages: int
    min_programs: int = 264   # split the context until the grid has this many programs
    # A call of at most this many sequence slots (a decode step's smallest bucket: 1 to that many
    # running sequences) gets as many splits as one live sequence would; the splits a call uses
    # are picked on device from the sequences that are live (kv_len > 0), up to that number.
    one_live_slots: int = 16
    # how a block of keys is gathered: "rows" (each key token's page id read from the page table,
    # the [tokens, D] tile loaded from the free [pages * page_size, D] view) or "pages" (the
    # [pages, page_size, D] tile loaded by page id and reshaped): see key_block
    gather: str = "rows"
    # > 0: a call with one context split whose output is stored in place runs this many programs, each looping
    # over the live sequences' (sequence, kv head) items pid, pid + programs, ... (gather "rows" only): a slot
    # with kv_len 0 then costs nothing (in a 2,048-token step of a 1,024-slot bucket most of the 8,192
    # (slot, head) programs have nothing to do, and each holds the pipeline's shared memory while it starts and
    # exits). 0: a program for every (sequence, kv head, split).
    persistent_programs: int = 0
    # fp8 pages only: which matrix products take the 8-bit operands as they are, on the GPU's fp8 matrix
    # instructions, instead of widening the tiles to float16 first: "off" (none), "qk" (the scores: the query
    # quantized per head row to e4m3 with a float32 scale, as FlashAttention-3's fp8 path quantizes it) or "qk_pv"
    # (the values' product too: the probabilities, in [0, 1], times 2**8 in e4m3). See ``fp8_products_for``.
    fp8_products: str = "off"
    # > 1: an in-place call with one context split (a program a (sequence, kv head), not persistent) of at most
    # ``balance_max_slots`` sequence slots, no sliding window, splits each live sequence whose context is longer
    # than the call's mean (its live sequences' blocks over their number, at least ``balance_min_blocks``) into
    # up to this many chunks, each a program of its own: a program's loop over one long context no longer sets the
    # call's time while the others sit idle. The last of a sequence's chunk programs to finish (an atomic count a
    # (sequence, kv head)) merges the chunks' partial results and stores the rows. 0 or 1: off, the tuned blocks'
    # setting. On an H100 over fp8 pages at drawn contexts (``python -m benchmarks.kernels --kv-dtype fp8 --entry-only
    # --decode-chunks 0,2,3 --entry-points 39/64/200-1360,88/128/100-1180,220/256/100-850``), the decode kernel as the
    # entry point calls it, µs off / 2 / 3 chunks: 54.5 / 59.1 / 72.8 at 39 live sequences, 90.4 / 75.0 / 76.3 at
    # 88, 121.8 / 124.6 / 129.1 at 220 (a grid of several waves balances itself); the ShareGPT-shaped offline run
    # with 2 chunks at up to 512 slots: 0.943x (two rounds, 2026-12-06, ``benchmarks/results/gpu_suite_h200.md``,
    # thirty-fourth session).
    balance_chunks: int = 0
    balance_max_slots: int = 512
    balance_min_blocks: int = 4


# Tuned on an H200 (benchmarks/kernels.py sweep, benchmarks/results/kernels_h200.md), keyed by
# (head_dim, page_size): gathering keys by row beat gathering by page at every mid-size point
# (batch 64, context 2048: 168 vs 247-297 µs); head_dim 64 from its own sweep (mean time / best
# 1.014 over batch 1-64, the old entry 1.10); the fallback serves any other shape.
TUNED_DECODE_BLOCKS: dict[tuple[int, int], DecodeBlockSizes] = {
    (128, 16): DecodeBlockSizes(pages_per_block=4, num_warps=4, num_stages=3, min_programs=264),
    (64, 16): DecodeBlockSizes(pages_per_block=4, num_warps=4, num_stages=4, min_programs=528),
}
_FALLBACK_BLOCKS = DecodeBlockSizes(pages_per_block=4, num_warps=4, num_stages=2)


# fp8 pages (1 byte a value), keyed as above: a ShareGPT-shaped run's decode rows are at short contexts, where
# the kernel over fp8 pages is held by its registers, not by the bytes (``decode_block_sizes``).
TUNED_FP8_DECODE_BLOCKS: dict[tuple[int, int], DecodeBlockSizes] = {
    (128, 16): DecodeBlockSizes(pages_per_block=2, num_warps=1, num_stages=6, min_programs=264),
}


def decode_block_sizes(head_dim: int, page_size: int, kv_dtype=None, num_seqs: int | None = None
                       ) -> DecodeBlockSizes:
    """The tuned blocks for ``(head_dim, page_size)``, pages of ``kv_dtype`` (None: 16-bit) and calls of
    ``num_seqs`` sequence slots (None: many).

    fp8 pages (``kv_cache_dtype="fp8"``) take their own table, ``TUNED_FP8_DECODE_BLOCKS``; a shape not in it
    takes the 16-bit blocks with twice the pages a block. Why (H200, ``benchmarks/results/gpu_suite_h200.md``,
    nineteenth session): widened to float16 for the products, fp8 tiles took 150 registers a thread at 4 warps
    and 4-page blocks (bf16 pages: 96), so 3 programs fit a multiprocessor and the kernel read at half the
    bandwidth (Nsight Compute at batch 768, context 304: 18.75 % occupancy, DRAM 50 %; bf16 pages 31 %, 86 %). One
    warp over 2-page blocks with 6 stages keeps the registers a program needs low and the loads in flight: batch
    768 x 304, 256 x 512, 256 x 2,048 and 64 x 2,048 in 201 / 116 / 324 / 121 µs, two warps 220 / 141 / 367 / 133 (one
    sweep); the doubled bf16 blocks (4 warps, 8 pages) took 306 / 164 / 455 / - in another machine's sweep, where two
    warps took 212 / 125 / 368 (``python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-variants ...
    --sweep-points 768x304,256x512,256x2048,64x2048``). Calls of at most ``one_live_slots``
    sequence slots keep the 16-bit blocks: their few sequences are split over the grid by blocks."""
    b = TUNED_DECODE_BLOCKS.get((head_dim, page_size), _FALLBACK_BLOCKS)
    if kv_dtype is None or jnp.dtype(kv_dtype).itemsize != 1 or (num_seqs is not None
                                                                  and num_seqs <= b.one_live_slots):
        return b
    fp8 = TUNED_FP8_DECODE_BLOCKS.get((head_dim, page_size))
    return fp8 if fp8 is not None else dataclasses.replace(b, pages_per_block=2 * b.pages_per_block)


def max_kernel_pages(kv_heads: int, page_size: int, head_dim: int) -> int:
    """The most pages a KV pool (one layer's K or V, ``kv_heads`` heads on a device) may hold for the kernels:
    Pallas' Triton lowering offsets elements with 32-bit integers unless the array exceeds 2**32 bytes, so an
    fp8 pool of 2**31 elements or more would wrap; keeping every pool below 2**31 elements is safe for every
    dtype (8 kv heads of 128, pages of 16: 131,071 pages)."""
    return (2 ** 31 - 1) // (kv_heads * page_size * head_dim)


def compute_dtype(q_dtype, kv_dtype):
    """The dtype the kernels multiply in: the query's, except with 1-byte (fp8) pages and a 16-bit query,
    float16 — e4m3 widens to float16 in one instruction a pair on the GPU (to bfloat16 it goes through wider
    types), float16 holds every e4m3 value exactly, and q, the probabilities and the values are well inside
    its range."""
    q_dtype = jnp.dtype(q_dtype)
    if jnp.dtype(kv_dtype).itemsize == 1 and q_dtype.itemsize == 2:
        return jnp.dtype(jnp.float16)
    return q_dtype


_F16_MAX = float(jnp.finfo(jnp.float16).max)
FP8_PRODUCTS = ("off", "qk", "qk_pv")
_E4M3_MAX = 448.0
_P_SCALE = 256.0        # probabilities in [0, 1] times this in e4m3 (whose largest value is 448)


# the fp8 matrix instruction's depth (mma m16n8k32): a product's contracted length must be a multiple of it
_FP8_MMA_K = 32


def fp8_products_for(fp8_products: str, q_dtype, kv_dtype, head_dim: int, block_tokens: int) -> str:
    """The products a call runs on e4m3 operands (ValueError for a value not in ``FP8_PRODUCTS``): ``fp8_products``
    over fp8 pages (float8_e4m3fn) under a 16-bit query where the contracted lengths fit the fp8 instruction (the
    scores' ``head_dim``, the values' tokens a block: multiples of 32); less otherwise ("qk_pv" over 16-token blocks
    is "qk"; a head_dim of 16, other pages or a float32 query: "off", the products widened as before)."""
    if fp8_products not in FP8_PRODUCTS:
        raise ValueError(f"fp8_products must be one of {FP8_PRODUCTS}, not {fp8_products!r}")
    if (fp8_products == "off" or jnp.dtype(kv_dtype) != jnp.dtype(jnp.float8_e4m3fn)
            or jnp.dtype(q_dtype).itemsize != 2 or head_dim % _FP8_MMA_K):
        return "off"
    return "qk" if fp8_products == "qk_pv" and block_tokens % _FP8_MMA_K else fp8_products


def quantize_query_rows(q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(q in e4m3, f32[rows] scales): each row of a loaded query tile over its largest magnitude times 448 (a row of
    zeros keeps scale 1)."""
    qf = q.astype(jnp.float32)
    amax = jnp.max(jnp.abs(qf), axis=1)
    scale = jnp.where(amax > 0, amax / _E4M3_MAX, 1.0)
    return (qf / scale[:, None]).astype(jnp.float8_e4m3fn), scale


def to_compute(x: jax.Array, dtype) -> jax.Array:
    """``x`` (a loaded query tile) in the products' ``dtype``; into float16 it saturates at +-65504 (a bf16 query
    can hold larger values, which a plain cast would make inf and the softmax NaN)."""
    if jnp.dtype(dtype) == jnp.float16 and x.dtype != jnp.float16:
        x = jnp.clip(x.astype(jnp.float32), -_F16_MAX, _F16_MAX)   # in f32: bf16 rounds 65504 up to 65536
    return x.astype(dtype)


def num_context_splits(num_seqs: int, num_kv_heads: int, num_blocks: int,
                       min_programs: int) -> int:
    """Splits of the context so that small batches still fill the GPU (a power of two)."""
    splits = 1
    while (num_seqs * num_kv_heads * splits < min_programs
           and num_blocks // (splits * 2) >= 2):
        splits *= 2
    return splits


def grid_splits(num_seqs: int, num_kv_heads: int, pages_per_seq: int, blocks: DecodeBlockSizes) -> int:
    """The context splits of the kernel's grid for a call of ``num_seqs`` sequence slots (static): what one
    live sequence needs up to ``blocks.one_live_slots`` slots, else what ``num_seqs`` need."""
    ppb = min(blocks.pages_per_block, pl.next_power_of_2(pages_per_seq))
    sized_for = 1 if num_seqs <= blocks.one_live_slots else num_seqs
    return num_context_splits(sized_for, num_kv_heads, pl.cdiv(pages_per_seq, ppb), blocks.min_programs)


def live_splits(kv_lens: jax.Array, num_kv_heads: int, max_splits: int,
                min_programs: int) -> jax.Array:
    """i32[1]: the splits a call uses, picked on device from its live sequences (kv_len > 0):
    the fewest that give ``min_programs`` programs, at most ``max_splits`` (the grid's)."""
    live = jnp.maximum(jnp.sum(kv_lens > 0), 1)
    want = -(-min_programs // (live * num_kv_heads))
    return jnp.clip(want, 1, max_splits).astype(jnp.int32).reshape(1)


def paged_decode_attention_reference(
    q: jax.Array,            # [S, num_q_heads, head_dim]   one query token per sequence
    k_pages: jax.Array,      # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,      # [num_kv_heads, num_pages, page_size, head_dim]
    kv_lens: jax.Array,      # i32[S] tokens in the cache (the query's own included); 0 = no query
    page_table: jax.Array,   # i32[S, P]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
) -> jax.Array:              # [S, num_q_heads, head_dim]; rows with kv_len 0 are 0
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    max_len = page_table.shape[1] * page_size
    k = k_pages[:, page_table].reshape(num_kv_heads, num_seqs, max_len, head_dim)
    v = v_pages[:, page_table].reshape(num_kv_heads, num_seqs, max_len, head_dim)
    qg = q.reshape(num_seqs, num_kv_heads, group, head_dim).astype(jnp.float32)
    s = jnp.einsum("skgd,ksld->skgl", qg, k.astype(jnp.float32)) * sm_scale
    key_pos = jnp.arange(max_len, dtype=jnp.int32)[None, :]
    mask = key_pos < kv_lens[:, None]
    if sliding_window is not None:
        mask &= key_pos >= kv_lens[:, None] - sliding_window
    s = jnp.where(mask[:, None, None, :], s, _MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("skgl,ksld->skgd", p, v.astype(jnp.float32))
    o = jnp.where((kv_lens > 0)[:, None, None, None], o, 0.0)
    return o.reshape(num_seqs, num_q_heads, head_dim).astype(q.dtype)


def key_block(k_ref, v_ref, pt_ref, first_page, pages_per_block: int, page_size: int, end_page,
              gather: str, interpret: bool, dtype=None, *, pt_base=0, pt_len: int | None = None, row_base=0,
              num_pages: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(k, v) [pages_per_block * page_size, D]: the keys and values of the sequence's pages
    ``first_page ..`` (positions in its page table ``pt_ref``); pages at or past ``end_page`` are
    not read on GPU (0) and must be masked by the caller (interpret mode reads them: its gathers
    take no mask, and every id is clipped into range).

    ``gather="rows"``: ``k_ref``/``v_ref`` are one kv head's ``[pages * page_size, D]`` view; each
    key token reads its page id from the page table (``page_size`` tokens share one id, an L1
    hit) and the tile is loaded as ``[tokens, D]``, no reshape of the loaded data.
    ``gather="pages"``: they are ``[pages, page_size, D]``; the block's page ids are read once
    and the ``[pages, page_size, D]`` tile is reshaped to ``[tokens, D]``.
    ``dtype``: the tiles widened to it once loaded (fp8 pages, read at half the bytes, multiplied in
    ``compute_dtype``); None: the pages' dtype.
    ``pt_base``, ``pt_len``, ``row_base``, ``num_pages`` (gather "rows"): the sequence's page table is
    ``pt_ref[pt_base : pt_base + pt_len]`` and the kv head's rows start at row ``row_base`` of ``k_ref`` / ``v_ref``,
    which hold ``num_pages`` pages a head (the persistent grid's flat views); by default the refs are the
    sequence's and the head's own.
    """
    tokens = pages_per_block * page_size
    pt_len = pt_ref.shape[0] if pt_len is None else pt_len
    if gather == "rows":
        offsets = jnp.arange(tokens, dtype=jnp.int32)
        page = first_page + offsets // page_size
        num_pages = k_ref.shape[0] // page_size if num_pages is None else num_pages
    else:
        page = first_page + jnp.arange(pages_per_block, dtype=jnp.int32)
        num_pages = k_ref.shape[0]
    if interpret:
        ids = pt_ref[pt_base + jnp.clip(page, 0, pt_len - 1)]
    else:
        ids = pltriton.load(pt_ref.at[pt_base + page], mask=page < pt_len, other=0)
    ids = jnp.clip(ids, 0, num_pages - 1)
    ok = page < end_page
    if gather == "rows":
        index, mask = row_base + ids * page_size + offsets % page_size, ok[:, None]
    else:
        index, mask = ids, ok[:, None, None]
    if interpret:
        k, v = k_ref[index], v_ref[index]
    else:
        k = pltriton.load(k_ref.at[index], mask=mask, other=0.0)
        v = pltriton.load(v_ref.at[index], mask=mask, other=0.0)
    if dtype is not None and k.dtype != dtype:
        k, v = k.astype(dtype), v.astype(dtype)
    return k.reshape(tokens, k.shape[-1]), v.reshape(tokens, v.shape[-1])


def _attend(length, qrow, head, split, splits, q_ref, k_ref, v_ref, pt_ref, *, sm_scale: float, page_size: int,
            pages_per_block: int, group: int, rows: int, sliding_window: int | None, precision, interpret: bool,
            gather: str, dtype, pt_base=0, pt_len: int | None = None, row_base=0, num_pages: int | None = None,
            fp8_products: str = "off"):
    """One (sequence, kv head, context split)'s attention: (run, first_block, num_blocks), where
    ``run()`` gives the unnormalised (acc f32[rows, D], m f32[rows], l f32[rows]) over the split's blocks of
    the sequence's ``length`` cached tokens, for the G query heads of kv head ``head`` at row ``qrow`` of q."""
    _, num_q_heads, head_dim = q_ref.shape
    block_tokens = pages_per_block * page_size
    # this sequence's blocks, shared evenly by the splits in use; later splits get none
    seq_blocks = pl.cdiv(pl.cdiv(length, page_size), pages_per_block)
    pages_per_split = pl.cdiv(seq_blocks, splits) * pages_per_block
    first_page = split * pages_per_split
    end_page = jnp.minimum(first_page + pages_per_split, pl.cdiv(length, page_size))
    first_block = 0
    if sliding_window is not None:
        window_page = jnp.maximum(length - sliding_window, 0) // page_size
        first_block = jnp.maximum(window_page - first_page, 0) // pages_per_block
    num_blocks = pl.cdiv(jnp.maximum(end_page - first_page, 0), pages_per_block)

    def run():
        # The G query heads of this kv head, padded to `rows` (the smallest dot tile) by the mask.
        q = pltriton.load(q_ref.at[qrow, pl.ds(head * group, rows)],
                          mask=(jnp.arange(rows, dtype=jnp.int32) < group)[:, None], other=0.0)
        if fp8_products != "off":         # the scores from e4m3 operands: q per row, the keys as stored
            q, q_scale = quantize_query_rows(q)
            score_scale = q_scale[:, None] * sm_scale
        else:
            q = to_compute(q, dtype)          # what the products take (compute_dtype)
            score_scale = sm_scale
        offsets = jnp.arange(block_tokens, dtype=jnp.int32)

        def body(b, carry):
            acc, m_prev, l_prev = carry
            page0 = first_page + b * pages_per_block
            k, v = key_block(k_ref, v_ref, pt_ref, page0, pages_per_block, page_size, end_page,
                             gather, interpret, dtype=None if fp8_products != "off" else dtype, pt_base=pt_base,
                             pt_len=pt_len, row_base=row_base, num_pages=num_pages)
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * score_scale
            key_pos = page0 * page_size + offsets
            valid = key_pos < length
            if sliding_window is not None:
                valid &= key_pos >= length - sliding_window
            s = jnp.where(valid[None, :], s, _MASK_VALUE)
            m_next = jnp.maximum(m_prev, s.max(axis=1))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(s - m_next[:, None])
            l_next = alpha * l_prev + p.sum(axis=1)
            if fp8_products == "qk_pv":
                pv = lax.dot_general((p * _P_SCALE).astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     precision=precision, preferred_element_type=jnp.float32) * (1.0 / _P_SCALE)
            else:
                if fp8_products == "qk":
                    v = v.astype(dtype)
                pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)
            return acc * alpha[:, None] + pv, m_next, l_next

        init = (jnp.zeros((rows, head_dim), jnp.float32),
                jnp.full((rows,), _MASK_VALUE, jnp.float32),
                jnp.zeros((rows,), jnp.float32))
        return lax.fori_loop(first_block, num_blocks, body, init)

    return run, first_block, num_blocks


def _normalised(acc, l, dtype):
    """The attention rows ``acc / l`` in ``dtype`` (0 where a row saw no key: l = 0)."""
    return (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(dtype)


def _store_rows(o_ref, qrow, head, group: int, rows: int, acc, l):
    """The normalised G query heads' rows of kv head ``head`` into ``o_ref`` [T, H, D] at row ``qrow``."""
    pltriton.store(o_ref.at[qrow, pl.ds(head * group, rows)], _normalised(acc, l, o_ref.dtype),
                   mask=(jnp.arange(rows, dtype=jnp.int32) < group)[:, None])


def _decode_kernel(lens_ref, qrow_ref, splits_ref, pt_ref, q_ref, k_ref, v_ref, *out_refs,
                   sm_scale: float, page_size: int, pages_per_block: int, group: int, rows: int,
                   sliding_window: int | None, precision, interpret: bool, gather: str,
                   in_place: bool, dtype, fp8_products: str = "off"):
    # lens_ref, qrow_ref: i32[1] (this sequence's kv_len, its query's row of q); splits_ref: i32[1]
    # (splits in use, <= the grid's); pt_ref: i32[P]; q_ref: [T, num_q_heads, D];
    # k_ref, v_ref: [num_pages, page_size, D] (this kv head), or [num_pages * page_size, D]
    # with gather="rows"
    # out_refs: (o [R, D] normalised,) with one split, else (o f32[R, D], m f32[R], l f32[R]);
    # with splits, o is left unwritten where the program has no keys (l = 0 there);
    # with ``in_place`` (one split): (o [T, num_q_heads, D],), the normalised G rows stored at the
    # query's row and this kv head's query heads, nothing stored for a sequence with kv_len 0
    head, split = pl.program_id(1), pl.program_id(2)
    length = lens_ref[0]
    run, first_block, num_blocks = _attend(
        length, qrow_ref[0], head, split, splits_ref[0], q_ref, k_ref, v_ref, pt_ref, sm_scale=sm_scale,
        page_size=page_size, pages_per_block=pages_per_block, group=group, rows=rows,
        sliding_window=sliding_window, precision=precision, interpret=interpret, gather=gather, dtype=dtype,
        fp8_products=fp8_products)
    if in_place:
        # out_refs: (the previous output aliased [T, H, D],); the query's own rows only
        @pl.when(length > 0)
        def _():
            acc, _, l = run()
            _store_rows(out_refs[-1], qrow_ref[0], head, group, rows, acc, l)
    elif len(out_refs) == 1:
        acc, _, l = run()
        out_refs[0][...] = _normalised(acc, l, out_refs[0].dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

        @pl.when(num_blocks > first_block)
        def _():
            acc, m, l = run()
            o_ref[...] = acc
            m_ref[...] = m
            l_ref[...] = l


def _decode_kernel_persistent(live_ref, order_ref, lens_ref, qrow_ref, pt_ref, q_ref, k_ref, v_ref, o_in_ref, o_ref,
                              *, num_kv_heads: int, num_programs: int, pages_per_seq: int, num_pages: int,
                              page_size: int, group: int, rows: int, **kw):
    # live_ref: i32[1] (the sequences with kv_len > 0); order_ref: i32[S] (those sequences' slots first);
    # lens_ref, qrow_ref: i32[S]; pt_ref: i32[S * P] (the page table, flat); q_ref, o_ref: [T, H, D] (o_in_ref
    # aliased to o); k_ref, v_ref: [num_kv_heads * num_pages * page_size, D] (every head's rows, flat).
    # Program p takes the items p, p + programs, ... of the live sequences' live * kv_heads: item w is live
    # sequence order[w // kv_heads], kv head w % kv_heads; one context split each, its rows stored in place.
    pid = pl.program_id(0)

    def item(i, carry):
        w = pid + i * num_programs
        seq, head = order_ref[w // num_kv_heads], w % num_kv_heads
        qrow = qrow_ref[seq]
        run, _, _ = _attend(
            lens_ref[seq], qrow, head, 0, 1, q_ref, k_ref, v_ref, pt_ref, page_size=page_size, group=group,
            rows=rows, pt_base=seq * pages_per_seq, pt_len=pages_per_seq,
            row_base=head * (num_pages * page_size), num_pages=num_pages, **kw)
        acc, _, l = run()
        _store_rows(o_ref, qrow, head, group, rows, acc, l)
        return carry

    lax.fori_loop(0, pl.cdiv(jnp.maximum(live_ref[0] * num_kv_heads - pid, 0), num_programs), item, 0)


def _decode_kernel_balanced(lens_ref, qrow_ref, chunk_ref, pt_ref, q_ref, k_ref, v_ref, o_in_ref, count_in_ref,
                            o_ref, count_ref, po_ref, pm_ref, pl_ref, *, max_chunks: int, num_kv_heads: int,
                            page_size: int, pages_per_block: int, group: int, rows: int, interpret: bool, **kw):
    # lens_ref, qrow_ref: i32[1] (this sequence's kv_len and its query's row of q); chunk_ref: i32[1] (the call's
    # chunk, in blocks); pt_ref: i32[P]; q_ref, o_ref: [T, H, D] (o_in_ref aliased to o); k_ref, v_ref: this kv
    # head's [pages * page_size, D]; count_ref: i32[S * kv_heads] (zeros in, aliased to count_in_ref): the chunks
    # of a (sequence, kv head) done so far; po_ref f32[C, R, D], pm_ref / pl_ref f32[C, R]: this (sequence, kv
    # head)'s chunks' partial results (o, running max, running sum).
    seq, head, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length, qrow = lens_ref[0], qrow_ref[0]
    seq_blocks = pl.cdiv(pl.cdiv(length, page_size), pages_per_block)
    # chunks of at least the call's chunk, at most max_chunks of them; each of the first n is nonempty
    # ((n - 1) * cdiv(seq_blocks, n) < seq_blocks)
    n = pl.cdiv(seq_blocks, jnp.maximum(jnp.maximum(chunk_ref[0], pl.cdiv(seq_blocks, max_chunks)), 1))
    run, _, _ = _attend(length, qrow, head, chunk, jnp.maximum(n, 1), q_ref, k_ref, v_ref, pt_ref,
                        page_size=page_size, pages_per_block=pages_per_block, group=group, rows=rows,
                        interpret=interpret, **kw)

    @pl.when(chunk < n)
    def _():
        acc, m, l = run()

        @pl.when(n == 1)
        def _():
            _store_rows(o_ref, qrow, head, group, rows, acc, l)

        @pl.when(n > 1)
        def _():
            po_ref[chunk] = acc
            pm_ref[chunk] = m
            pl_ref[chunk] = l
            if not interpret:
                # every thread's partial stored before the count's release (CUTLASS's semaphore: a barrier, then
                # one thread's gpu-scope release; Triton's atomic is acquire-release, one thread's, its old value
                # handed to the program's threads through a barrier)
                pltriton.debug_barrier()
            done = pltriton.atomic_add(count_ref, seq * num_kv_heads + head, jnp.ones((), jnp.int32))

            @pl.when(done == n - 1)
            def _():
                # the last of the sequence's chunks to finish merges their partials (log-sum-exp), in chunk order
                # whichever finished last (the same rounding every call)
                def part(ref, j):     # volatile: past L1, to another multiprocessor's stores
                    return ref[j] if interpret else pltriton.load(ref.at[j], volatile=True)

                acc_all = jnp.zeros_like(acc)
                m_all = jnp.full_like(m, _MASK_VALUE)
                l_all = jnp.zeros_like(l)
                for j in range(max_chunks):
                    real = j < n
                    m_j = jnp.where(real, part(pm_ref, j), _MASK_VALUE)
                    m_new = jnp.maximum(m_all, m_j)
                    a, b = jnp.exp(m_all - m_new), jnp.where(real, jnp.exp(m_j - m_new), 0.0)
                    acc_all = acc_all * a[:, None] + jnp.where(real, part(po_ref, j), 0.0) * b[:, None]
                    l_all = l_all * a + jnp.where(real, part(pl_ref, j), 0.0) * b
                    m_all = m_new
                _store_rows(o_ref, qrow, head, group, rows, acc_all, l_all)


def balance_chunk_blocks(kv_lens: jax.Array, page_size: int, pages_per_block: int, min_blocks: int) -> jax.Array:
    """i32[1]: the chunk (in blocks of ``pages_per_block`` pages) a balanced call splits its longer contexts into:
    its live sequences' (kv_len > 0) mean blocks, at least ``min_blocks``."""
    blocks = -(-(-(-kv_lens // page_size)) // pages_per_block)
    live = jnp.maximum(jnp.sum(kv_lens > 0), 1)
    mean = -(-jnp.sum(jnp.where(kv_lens > 0, blocks, 0)) // live)
    return jnp.maximum(mean, min_blocks).astype(jnp.int32).reshape(1)


def balances(blocks: DecodeBlockSizes, num_seqs: int, sliding_window: int | None) -> bool:
    """Whether an in-place, one-split call of ``num_seqs`` slots splits its long contexts (``balance_chunks``)."""
    return (blocks.balance_chunks > 1 and blocks.persistent_programs == 0 and sliding_window is None
            and num_seqs <= blocks.balance_max_slots)


def live_first(kv_lens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(i32[1] the slots with kv_len > 0, i32[S] those slots in order then the others): a compaction by
    prefix sum (no sort: CUB's sort would split the step's CUDA graph)."""
    live = kv_lens > 0
    n = jnp.sum(live).astype(jnp.int32)
    slots = jnp.arange(kv_lens.shape[0], dtype=jnp.int32)
    at = jnp.where(live, jnp.cumsum(live) - 1, n + jnp.cumsum(~live) - 1)
    return n.reshape(1), kernel_zeros(slots.shape, slots.dtype, n).at[at].set(slots, unique_indices=True)


def kv_operands(k_pages, v_pages, gather: str, head_axis: int = 1):
    """(BlockSpec of one kv head's pages, k, v) as a kernel takes them for ``gather``; the kv
    head is the kernel's grid axis ``head_axis``.

    "rows" views the pages as [kv_heads, pages * page_size, D] (a reshape of contiguous
    memory: no copy)."""
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    if gather == "rows":
        shape = (num_kv_heads, num_pages * page_size, head_dim)
        spec = pl.BlockSpec((None, num_pages * page_size, head_dim),
                            lambda *g: (g[head_axis], 0, 0))
        return spec, k_pages.reshape(shape), v_pages.reshape(shape)
    if gather != "pages":
        raise ValueError(f"gather must be 'pages' or 'rows', not {gather!r}")
    spec = pl.BlockSpec((None, num_pages, page_size, head_dim),
                        lambda *g: (g[head_axis], 0, 0, 0))
    return spec, k_pages, v_pages


def whole_block(shape) -> pl.BlockSpec:
    """The whole array as every program's block, whatever the grid."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def flat_kv_operands(k_pages, v_pages, gather: str):
    """(BlockSpec, k, v) as the persistent grids take the pages: every kv head's rows as one
    [kv_heads * pages * page_size, D] view (a reshape of contiguous memory: no copy), whole in each program;
    keys gathered by row only."""
    if gather != "rows":
        raise ValueError("persistent_programs needs gather='rows'")
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    flat = (num_kv_heads * num_pages * page_size, head_dim)
    return whole_block(flat), k_pages.reshape(flat), v_pages.reshape(flat)


def _compiler_params(blocks: DecodeBlockSizes):
    return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "interpret",
                                             "blocks", "num_splits", "merged_rows"))
def paged_decode_attention_kernel(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
    page_table: jax.Array, *, sm_scale: float, sliding_window: int | None = None,
    interpret: bool = False, blocks: DecodeBlockSizes | None = None,
    num_splits: int | None = None, q_rows: jax.Array | None = None, out: jax.Array | None = None,
    merged_rows: bool = False,
) -> jax.Array:
    """The Pallas kernel (GPU, or Pallas interpret mode); same contract as the reference.

    ``q_rows`` (i32[S]): sequence ``s``'s query is row ``q_rows[s]`` of ``q`` ([T, H, D], e.g. a
    ragged batch's packed tokens), read in place; without it ``q`` is [S, H, D].
    ``out`` ([T, H, D] like ``q``, with ``q_rows``, one context split): the result is ``out`` with
    each live sequence's (kv_len > 0) attention written at its query's row, every other row as it
    was; the kernel stores those rows into ``out``'s buffer (aliased: no copy when the caller gives
    it up), its query heads' rows only.
    ``merged_rows`` (with ``q_rows``, no ``out``): the result is [T, H, D] like ``q``, each live sequence's attention
    at its query's row and every other row 0 (``out``'s contract on zeros), with context splits merged by one
    kernel that writes the rows (``merge_splits_into_rows``) rather than by XLA's operations and a gather.
    ``num_splits``: the context splits (every one used); by default the grid gets what the
    number of sequence slots needs (one live sequence's, up to ``blocks.one_live_slots`` slots)
    and each call uses as many of them as its live sequences need (``live_splits``)."""
    num_q_heads, head_dim = q.shape[1:]
    num_seqs = kv_lens.shape[0]
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    group = num_q_heads // num_kv_heads
    blocks = blocks or decode_block_sizes(head_dim, page_size, k_pages.dtype, num_seqs)
    ppb = min(blocks.pages_per_block, pl.next_power_of_2(pages_per_seq))
    if num_splits is None:
        splits = grid_splits(num_seqs, num_kv_heads, pages_per_seq, blocks)
        in_use = live_splits(kv_lens, num_kv_heads, splits, blocks.min_programs)
    else:
        splits = num_splits
        in_use = jnp.full((1,), splits, jnp.int32)
    rows = max(_MIN_ROWS, pl.next_power_of_2(group))
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    if q_rows is None:
        if out is not None:
            raise ValueError("out needs q_rows: the row of each sequence's query in q and out")
        q_rows = jnp.arange(num_seqs, dtype=jnp.int32)
    if merged_rows and (out is not None or splits == 1):
        raise ValueError("merged_rows: the context splits' merge makes the output (no out; one split stores into "
                         "out in place)")
    if out is not None and out.shape != q.shape:
        raise ValueError(f"out must have q's shape {q.shape}, not {out.shape}")
    if out is not None and splits != 1:
        raise ValueError(f"out needs one context split, not {splits} (grid_splits)")
    in_place = out is not None
    static = dict(sm_scale=sm_scale, pages_per_block=ppb, sliding_window=sliding_window, precision=precision,
                  interpret=interpret, gather=blocks.gather, dtype=compute_dtype(q.dtype, k_pages.dtype),
                  fp8_products=fp8_products_for(blocks.fp8_products, q.dtype, k_pages.dtype, head_dim,
                                                ppb * page_size))
    if in_place and splits == 1 and blocks.persistent_programs > 0:
        kv_spec, k_in, v_in = flat_kv_operands(k_pages, v_pages, blocks.gather)
        programs = min(blocks.persistent_programs, num_seqs * num_kv_heads)
        kernel = functools.partial(
            _decode_kernel_persistent, num_kv_heads=num_kv_heads, num_programs=programs,
            pages_per_seq=pages_per_seq, num_pages=num_pages, page_size=page_size, group=group, rows=rows,
            **static)
        live, order = live_first(kv_lens)
        return pl.pallas_call(
            kernel, grid=(programs,),
            in_specs=[whole_block((1,)), whole_block((num_seqs,)), whole_block((num_seqs,)), whole_block((num_seqs,)),
                      whole_block((num_seqs * pages_per_seq,)), whole_block(q.shape), kv_spec, kv_spec,
                      whole_block(q.shape)],
            out_specs=whole_block(q.shape), out_shape=jax.ShapeDtypeStruct(q.shape, out.dtype),
            interpret=interpret, compiler_params=None if interpret else _compiler_params(blocks),
            input_output_aliases={8: 0}, name="paged_decode_attention",
        )(live, order, kv_lens.astype(jnp.int32), q_rows.astype(jnp.int32), page_table.astype(jnp.int32).reshape(-1),
          q, k_in, v_in, out)

    if in_place and splits == 1 and balances(blocks, num_seqs, sliding_window):
        return _balanced_call(q, k_pages, v_pages, kv_lens, page_table, q_rows, out, blocks=blocks, group=group,
                              rows=rows, static=static)

    kernel = functools.partial(
        _decode_kernel, page_size=page_size, group=group, rows=rows, in_place=in_place, **static)
    kv_spec, k_in, v_in = kv_operands(k_pages, v_pages, blocks.gather)
    in_specs = [
        pl.BlockSpec((1,), lambda s, h, c: (s,)),
        pl.BlockSpec((1,), lambda s, h, c: (s,)),
        pl.BlockSpec((1,), lambda s, h, c: (0,)),
        pl.BlockSpec((None, pages_per_seq), lambda s, h, c: (s, 0)),
        pl.BlockSpec(q.shape, lambda s, h, c: (0, 0, 0)),
        kv_spec, kv_spec,
    ]
    operands = [kv_lens.astype(jnp.int32), q_rows.astype(jnp.int32), in_use,
                page_table.astype(jnp.int32), q, k_in, v_in]
    aliases = {}
    if in_place:      # the kernel normalises and stores each live query's rows into ``out``
        in_specs.append(pl.BlockSpec(q.shape, lambda s, h, c: (0, 0, 0)))
        aliases = {len(operands): 0}
        operands.append(out)
        out_specs = pl.BlockSpec(q.shape, lambda s, h, c: (0, 0, 0))
        out_shape = jax.ShapeDtypeStruct(q.shape, out.dtype)
    elif splits == 1:   # the kernel normalises and writes the final rows
        out_specs = pl.BlockSpec((None, None, rows, head_dim), lambda s, h, c: (s, h, 0, 0))
        out_shape = jax.ShapeDtypeStruct((num_seqs, num_kv_heads, rows, head_dim), q.dtype)
    else:
        out_specs = [
            pl.BlockSpec((None, None, None, rows, head_dim), lambda s, h, c: (s, c, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, h, c: (s, c, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, h, c: (s, c, h, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((num_seqs, splits, num_kv_heads, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_seqs, splits, num_kv_heads, rows), jnp.float32),
            jax.ShapeDtypeStruct((num_seqs, splits, num_kv_heads, rows), jnp.float32),
        ]
    result = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(blocks),
        input_output_aliases=aliases,
        name="paged_decode_attention",
    )(*operands)

    if in_place:
        return result
    if merged_rows:
        return merge_splits_into_rows(*result, kv_lens, q_rows, num_rows=q.shape[0], group=group, dtype=q.dtype,
                                      interpret=interpret)
    if splits == 1:
        o = result[:, :, :group]
    else:
        o, m, l = result
        o = combine_splits(o[..., :group, :], m[..., :group], l[..., :group])
    return o.reshape(num_seqs, num_q_heads, head_dim).astype(q.dtype)


def _balanced_call(q, k_pages, v_pages, kv_lens, page_table, q_rows, out, *, blocks: DecodeBlockSizes, group: int,
                   rows: int, static: dict) -> jax.Array:
    """The in-place call with long contexts split into chunks (``DecodeBlockSizes.balance_chunks``): a grid of
    (sequence slot, kv head, chunk), chunks past a sequence's own count doing nothing; ``static``: the kernel's
    static arguments (no sliding window: ``balances``)."""
    num_seqs = kv_lens.shape[0]
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    pages_per_seq = page_table.shape[1]
    max_chunks = blocks.balance_chunks
    kernel = functools.partial(_decode_kernel_balanced, max_chunks=max_chunks, num_kv_heads=num_kv_heads,
                               page_size=page_size, group=group, rows=rows, **static)
    kv_spec, k_in, v_in = kv_operands(k_pages, v_pages, blocks.gather)
    kv_lens = kv_lens.astype(jnp.int32)
    chunk = balance_chunk_blocks(kv_lens, page_size, static["pages_per_block"], blocks.balance_min_blocks)
    per_seq = pl.BlockSpec((1,), lambda s, h, c: (s,))
    whole_q = pl.BlockSpec(q.shape, lambda s, h, c: (0, 0, 0))
    counts = whole_block((num_seqs * num_kv_heads,))
    part = pl.BlockSpec((None, max_chunks, None, rows, head_dim), lambda s, h, c: (s, 0, h, 0, 0))
    part_ml = pl.BlockSpec((None, max_chunks, None, rows), lambda s, h, c: (s, 0, h, 0))
    f32 = jnp.float32
    result = pl.pallas_call(
        kernel, grid=(num_seqs, num_kv_heads, max_chunks),
        in_specs=[per_seq, per_seq, pl.BlockSpec((1,), lambda s, h, c: (0,)),
                  pl.BlockSpec((None, pages_per_seq), lambda s, h, c: (s, 0)), whole_q, kv_spec, kv_spec, whole_q,
                  counts],
        out_specs=[whole_q, counts, part, part_ml, part_ml],
        out_shape=[jax.ShapeDtypeStruct(q.shape, out.dtype),
                   jax.ShapeDtypeStruct((num_seqs * num_kv_heads,), jnp.int32),
                   jax.ShapeDtypeStruct((num_seqs, max_chunks, num_kv_heads, rows, head_dim), f32),
                   jax.ShapeDtypeStruct((num_seqs, max_chunks, num_kv_heads, rows), f32),
                   jax.ShapeDtypeStruct((num_seqs, max_chunks, num_kv_heads, rows), f32)],
        interpret=static["interpret"], compiler_params=None if static["interpret"] else _compiler_params(blocks),
        input_output_aliases={7: 0, 8: 1}, name="paged_decode_attention",
    )(kv_lens, q_rows.astype(jnp.int32), chunk, page_table.astype(jnp.int32), q, k_in, v_in, out,
      kernel_zeros((num_seqs * num_kv_heads,), jnp.int32, q_rows[0].astype(jnp.int32), tie=q))
    return result[0]


def combine_splits(o: jax.Array,   # f32[S, C, K, G, D] unnormalised partial outputs
                   m: jax.Array,   # f32[S, C, K, G]    running max of each split
                   l: jax.Array,   # f32[S, C, K, G]    running sum of each split
                   ) -> jax.Array:  # f32[S, K, G, D]
    """Merge context splits (log-sum-exp); a row no split saw (l = 0 everywhere) is 0. A split
    with l = 0 adds nothing, whatever its ``o`` holds (the kernel leaves it unwritten)."""
    m_max = m.max(axis=1, keepdims=True)
    w = jnp.where(l > 0, jnp.exp(m - m_max), 0.0)
    den = (w * l).sum(axis=1)
    num = jnp.where(w[..., None] > 0, w[..., None] * o, 0.0).sum(axis=1)
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)


def _merge_rows_kernel(lens_ref, qrow_ref, o_ref, m_ref, l_ref, out_ref, *, num_seqs: int, splits: int, group: int,
                       group_rows: int):
    # program (row r, kv head h): the sequence whose live query is row r, if any, its splits' partial results for
    # kv head h's G query heads merged (``combine_splits``'s arithmetic, the splits taken MERGE_UNROLL at a time
    # with the running maximum rescaling what came before), else zeros, stored at row r
    r, h = pl.program_id(0), pl.program_id(1)
    seqs = jnp.arange(pl.next_power_of_2(num_seqs), dtype=jnp.int32)
    valid = seqs < num_seqs
    lens = pltriton.load(lens_ref.at[pl.ds(0, seqs.shape[0])], mask=valid, other=0)
    qrows = pltriton.load(qrow_ref.at[pl.ds(0, seqs.shape[0])], mask=valid, other=-1)
    match = (qrows == r) & (lens > 0) & valid
    found = jnp.max(match.astype(jnp.int32)) > 0
    s = jnp.max(jnp.where(match, seqs, 0))          # in range whatever the rows hold
    heads = pl.ds(0, group_rows)
    dst = out_ref.at[r, pl.ds(h * group, group_rows)]
    rows_mask = (jnp.arange(group_rows, dtype=jnp.int32) < group)[:, None]
    chunk = min(splits, MERGE_UNROLL)

    def merge(i, carry):
        # unrolled over a chunk's splits (every load in flight at once; Triton's lowering slices no loaded array)
        m_run, den, num = carry
        first = i * chunk
        ms = [m_ref[s, first + c, h, heads] for c in range(chunk)]
        ls = [l_ref[s, first + c, h, heads] for c in range(chunk)]
        m_new = functools.reduce(jnp.maximum, ms, m_run)
        alpha = jnp.exp(m_run - m_new)
        den, num = den * alpha, num * alpha[:, None]
        for c in range(chunk):
            w = jnp.where(ls[c] > 0, jnp.exp(ms[c] - m_new), 0.0)
            den = den + w * ls[c]
            num = num + jnp.where(w[:, None] > 0, w[:, None] * o_ref[s, first + c, h, heads, :], 0.0)
        return m_new, den, num

    @pl.when(found)
    def _():
        init = (jnp.full((group_rows,), _MASK_VALUE, jnp.float32), jnp.zeros((group_rows,), jnp.float32),
                jnp.zeros((group_rows, o_ref.shape[-1]), jnp.float32))
        _, den, num = (merge(0, init) if chunk == splits else lax.fori_loop(0, splits // chunk, merge, init))
        merged = jnp.where((den > 0)[:, None], num / jnp.where(den > 0, den, 1.0)[:, None], 0.0)
        pltriton.store(dst, merged.astype(out_ref.dtype), mask=rows_mask)

    @pl.when(jnp.logical_not(found))
    def _():            # no live query at this row: zeros, without reading any partial result
        pltriton.store(dst, jnp.zeros((group_rows, o_ref.shape[-1]), out_ref.dtype), mask=rows_mask)


def merge_splits_into_rows(o: jax.Array, m: jax.Array, l: jax.Array, kv_lens: jax.Array, q_rows: jax.Array, *,
                           num_rows: int, group: int, dtype, interpret: bool = False) -> jax.Array:
    """[num_rows, K * group, D] in ``dtype``: sequence ``s``'s context splits (``o`` f32[S, C, K, R, D], ``m``, ``l``
    f32[S, C, K, R], R >= group; a split with l = 0 adds nothing) merged as ``combine_splits`` merges them, at row
    ``q_rows[s]`` for each live sequence (``kv_lens`` > 0), every other row 0: one program a (row, kv head), which
    writes its row whether a sequence owns it or not (no zero-filled buffer first)."""
    num_seqs, splits, num_kv_heads, r, head_dim = o.shape
    group_rows = pl.next_power_of_2(group)
    if group_rows > r:
        raise ValueError(f"the partial results hold {r} rows a kv head, fewer than the group's {group}")
    if splits > MERGE_UNROLL and splits % MERGE_UNROLL:
        raise ValueError(f"{splits} context splits: beyond {MERGE_UNROLL} the merge takes multiples of {MERGE_UNROLL} "
                         "(grid_splits gives powers of two)")
    kernel = functools.partial(_merge_rows_kernel, num_seqs=num_seqs, splits=splits, group=group,
                               group_rows=group_rows)
    shape = (num_rows, num_kv_heads * group, head_dim)
    return pl.pallas_call(
        kernel, grid=(num_rows, num_kv_heads),
        in_specs=[whole_block((num_seqs,)), whole_block((num_seqs,)), whole_block(o.shape), whole_block(m.shape),
                  whole_block(l.shape)],
        out_specs=whole_block(shape), out_shape=jax.ShapeDtypeStruct(shape, dtype),
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=MERGE_WARPS, num_stages=1),
        name="merge_decode_splits",
    )(kv_lens.astype(jnp.int32), q_rows.astype(jnp.int32), o, m, l)


def kernel_zeros(shape, dtype, anchor: jax.Array, tie: jax.Array | None = None) -> jax.Array:
    """Zeros that XLA cannot fold to a constant: a select on ``anchor``, an int32 scalar of the step's inputs that is
    never negative (not ``jnp.zeros``). XLA emits a buffer filled with a constant as a memset thunk, which is not a
    command of its CUDA graphs: in a step each one ends a graph (the attention's in-place output, every layer), and in
    a ``lax.cond`` / ``lax.switch`` branch it keeps the conditional out of the graph, where it copies its index to the
    host and waits. These zeros are a kernel like any other. The anchor must be a signed integer: XLA folds
    ``anchor < 0`` of an unsigned one to false, and the constant (the memset) comes back.

    ``tie``: an array of the caller's own (a layer's query) that the anchor passes an optimization barrier with, so
    that the zeros are this call's alone. Without it every layer's zeros are one expression, which XLA's CSE makes
    one buffer; a kernel that stores into the zeros in place (``input_output_aliases``) then gets a copy of that
    buffer each layer (a read and a write of the whole output: in the 8B shape's 2,048-token step 10 µs a layer,
    against the 5 µs of writing zeros)."""
    _check_anchor("kernel_zeros", anchor)
    if tie is not None:
        anchor, _ = lax.optimization_barrier((anchor, tie))
    return jnp.broadcast_to(jnp.where(anchor < 0, anchor, 0).astype(dtype), shape)


def step_copy(x: jax.Array, anchor: jax.Array) -> jax.Array:
    """``x`` copied into a buffer of the computation's own (a kernel XLA cannot fold away: a select on ``anchor``, as
    ``kernel_zeros``): what reads the copy reads the step's temp buffer, which the allocator hands out at the same
    address call after call as a rule (XLA's ``xla_gpu_command_buffer_update_mode=SKIP_TEMP`` makes it certain),
    where a parameter or an output of the step is at a new address every call."""
    _check_anchor("step_copy", anchor)
    return jnp.where(anchor < 0, jnp.zeros_like(x), x)


def _check_anchor(name: str, anchor) -> None:
    """TypeError unless ``anchor`` is a signed integer: XLA folds ``anchor < 0`` of an unsigned one to false, and
    the select it guards with it to a constant."""
    if not jnp.issubdtype(jnp.asarray(anchor).dtype, jnp.signedinteger):
        raise TypeError(f"{name}: the anchor must be a signed integer, not {jnp.asarray(anchor).dtype}")


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def paged_decode_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
    page_table: jax.Array, *, sm_scale: float, sliding_window: int | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Entry point. ``impl``: ``auto`` (kernel on GPU, else reference), ``kernel``,
    ``interpret`` (the kernel through Pallas interpret mode) or ``reference``."""
    if impl == "auto":
        impl = "kernel" if on_gpu() else "reference"
    if impl == "reference":
        return paged_decode_attention_reference(q, k_pages, v_pages, kv_lens, page_table,
                                                sm_scale=sm_scale, sliding_window=sliding_window)
    if impl not in ("kernel", "interpret"):
        raise ValueError(f"impl must be auto, kernel, interpret or reference, not {impl!r}")
    return paged_decode_attention_kernel(q, k_pages, v_pages, kv_lens, page_table,
                                         sm_scale=sm_scale, sliding_window=sliding_window,
                                         interpret=impl == "interpret")
