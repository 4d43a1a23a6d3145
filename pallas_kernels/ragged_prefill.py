"""Ragged prefill paged attention: packed query chunks of many sequences over their pages (Pallas, GPU).

The query tokens of all prefill chunks are packed in one array; each chunk
attends to its sequence's earlier pages (prefix-cache hits and earlier chunks)
and causally within itself. The work is cut into items of ``block_q`` query
tokens of one sequence (a chunk of ``n`` tokens gives ``ceil(n / block_q)``
items); one program serves one (kv head, item) and multiplies all ``G`` query
heads of that kv head at once (``block_q * G`` rows), so each KV page it
gathers out of the cache is read once per kv head and item. Blocks of
``pages_per_block`` pages stream through an online softmax in float32; only
blocks up to the item's last query position are read (causal), and with a
sliding window only the blocks inside it.

The item list (sequence, first row, rows, first query position) is computed on
the device from ``cu_q_lens`` and ``kv_lens`` with a static upper bound of
``ceil(T / block_q) + S`` items, so the step's shapes never depend on the data.
With ``PrefillBlockSizes.persistent_programs`` the grid is (kv head, that many
programs) instead, each program looping over the real items (counted on the
device, listed first), so the bound's padding items cost no program each.

Backend: Pallas on Triton, for the reasons given in ``paged_decode.py``
(page-granular gathers by page id, which Triton expresses as pipelined pointer
loads, and interpret mode on CPU CI).

Sequences whose ``q_len`` is not above ``min_q_len`` are skipped (the ragged
entry point gives single decode tokens to the decode kernel); their rows of
the output are left unwritten and must be masked by the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.paged_decode import (_MASK_VALUE, _normalised, compute_dtype, flat_kv_operands, key_block,
                                         kv_operands, pltriton, to_compute, whole_block)

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class PrefillBlockSizes:
    block_rows: int        # query rows per program: block_q * G
    pages_per_block: int   # pages gathered per loop iteration
    num_warps: int
    num_stages: int
    gather: str = "rows"   # "rows" or "pages": see paged_decode.key_block
    # > 0: that many programs a kv head, each looping over the step's real items (pid, pid + programs, ...), so
    # the static bound's padding items (``ceil(T / block_q) + S``: 1,088 a head in a 2,048-token step of 1,024
    # slots, none of them real in a decode-only step) cost no program each (gather "rows" only); 0: a program
    # an item
    persistent_programs: int = 0


# Tuned on an H200 (benchmarks/kernels.py sweep, benchmarks/results/kernels_h200.md), keyed by
# (head_dim, page_size); head_dim 64 from its own sweep (1 / 4 fresh 2048-token chunks: 100 / 326 µs,
# the head_dim 128 entry 155 / 446 µs).
TUNED_PREFILL_BLOCKS: dict[tuple[int, int], PrefillBlockSizes] = {
    (128, 16): PrefillBlockSizes(block_rows=128, pages_per_block=4, num_warps=4, num_stages=3),
    (64, 16): PrefillBlockSizes(block_rows=64, pages_per_block=4, num_warps=4, num_stages=3),
}
_FALLBACK_BLOCKS = PrefillBlockSizes(block_rows=64, pages_per_block=4, num_warps=4, num_stages=2)


def prefill_block_sizes(head_dim: int, page_size: int) -> PrefillBlockSizes:
    return TUNED_PREFILL_BLOCKS.get((head_dim, page_size), _FALLBACK_BLOCKS)


def work_items(cu_q_lens: jax.Array, kv_lens: jax.Array, *, block_q: int, num_items: int,
               min_q_len: int) -> jax.Array:
    """i32[num_items, 4]: (sequence, first packed row, rows, position of the first row).

    Items are listed last-first: the items at the end of each chunk, which read
    the most pages, start first, and the empty padding items come last.
    """
    num_seqs = kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    blocks = jnp.where(q_lens > min_q_len, pl.cdiv(q_lens, block_q), 0)
    ends = jnp.cumsum(blocks)
    starts = ends - blocks
    total = ends[-1]
    item = total - 1 - jnp.arange(num_items, dtype=jnp.int32)        # reversed; < 0: padding
    # one fused comparison instead of searchsorted's loop (a loop of kernels on GPU)
    seq = jnp.minimum((ends[None, :] <= item[:, None]).sum(axis=1), num_seqs - 1).astype(jnp.int32)
    j = item - starts[seq]
    valid = item >= 0
    first_row = cu_q_lens[seq] + j * block_q
    rows = jnp.where(valid, jnp.minimum(block_q, q_lens[seq] - j * block_q), 0)
    first_pos = kv_lens[seq] - q_lens[seq] + j * block_q
    return jnp.stack([seq, first_row, rows, first_pos], axis=1).astype(jnp.int32)


def _prefill_item(first_row, num_rows, first_pos, head, pt_ref, q_ref, k_ref, v_ref, o_ref, *, sm_scale: float,
                  page_size: int, pages_per_block: int, block_q: int, group: int, group_rows: int,
                  sliding_window: int | None, precision, interpret: bool, gather: str, dtype, pt_base=0,
                  pt_len: int | None = None, row_base=0, num_pages: int | None = None):
    """One (kv head, item): ``num_rows`` query tokens from packed row ``first_row`` (query position
    ``first_pos`` on) over their sequence's pages (``pt_ref``, from ``pt_base``), stored into ``o_ref``."""
    _, _, head_dim = q_ref.shape
    rows_per_item = block_q * group_rows
    block_tokens = pages_per_block * page_size
    scale_log2 = sm_scale * _LOG2E      # scores in log2 units: exp2 instead of exp
    # rows: block_q tokens x the G query heads of this kv head (padded to group_rows)
    io_mask = ((jnp.arange(block_q, dtype=jnp.int32) < num_rows)[:, None, None]
               & (jnp.arange(group_rows, dtype=jnp.int32) < group)[None, :, None])
    io_ref = (pl.ds(first_row, block_q), pl.ds(head * group, group_rows))
    q = pltriton.load(q_ref.at[io_ref], mask=io_mask, other=0.0)
    q = to_compute(q.reshape(rows_per_item, head_dim), dtype)   # what the products take (compute_dtype)
    # query position of each row (row r is token r // group_rows)
    q_pos = first_pos + jnp.arange(rows_per_item, dtype=jnp.int32) // group_rows
    last_pos = first_pos + num_rows - 1
    num_blocks = pl.cdiv(last_pos + 1, block_tokens)
    offsets = jnp.arange(block_tokens, dtype=jnp.int32)

    def step(b, carry, masked: bool):
        acc, m_prev, l_prev = carry
        # pages at or before the item's last position; later ones are not read on GPU
        k, v = key_block(k_ref, v_ref, pt_ref, b * pages_per_block, pages_per_block, page_size,
                         last_pos // page_size + 1, gather, interpret, dtype=dtype, pt_base=pt_base,
                         pt_len=pt_len, row_base=row_base, num_pages=num_pages)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale_log2
        if masked:
            key_pos = b * block_tokens + offsets
            valid = key_pos[None, :] <= q_pos[:, None]
            if sliding_window is not None:
                valid &= key_pos[None, :] > q_pos[:, None] - sliding_window
            s = jnp.where(valid, s, _MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        if masked:   # a row whose keys are all masked in this block adds nothing
            p = jnp.where(valid, p, 0.0)
        l_next = alpha * l_prev + p.sum(axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_next, l_next

    carry = (jnp.zeros((rows_per_item, head_dim), jnp.float32),
             jnp.full((rows_per_item,), _MASK_VALUE, jnp.float32),
             jnp.zeros((rows_per_item,), jnp.float32))
    if sliding_window is None:
        # blocks wholly at or before the first query position need no mask
        full_blocks = (first_pos + 1) // block_tokens
        carry = lax.fori_loop(0, full_blocks, functools.partial(step, masked=False), carry)
        first_masked = full_blocks
    else:
        first_masked = jnp.maximum(first_pos - sliding_window + 1, 0) // block_tokens
    acc, _, l = lax.fori_loop(first_masked, num_blocks, functools.partial(step, masked=True),
                              carry)
    out = _normalised(acc, l, o_ref.dtype).reshape(block_q, group_rows, head_dim)
    pltriton.store(o_ref.at[io_ref], out, mask=io_mask)


def _prefill_kernel(item_ref, pt_ref, q_ref, k_ref, v_ref, *o_refs, **kw):
    # item_ref: i32[4]; pt_ref: i32[P]; q_ref: [T, num_q_heads, D];
    # k_ref, v_ref: [num_pages, page_size, D] (this kv head), [num_pages * page_size, D] with
    # gather="rows"; o_refs: (o [T, num_q_heads, D],), or (the aliased input, o) with ``out``
    head = pl.program_id(0)
    first_row, num_rows, first_pos = item_ref[1], item_ref[2], item_ref[3]

    @pl.when(num_rows > 0)
    def _():
        _prefill_item(first_row, num_rows, first_pos, head, pt_ref, q_ref, k_ref, v_ref, o_refs[-1], **kw)


def _prefill_kernel_persistent(real_ref, item_ref, pt_ref, q_ref, k_ref, v_ref, *o_refs, num_programs: int,
                               pages_per_seq: int, num_pages: int, page_size: int, **kw):
    # real_ref: i32[1] (the real items, listed first, longest first); item_ref: i32[W, 4]; pt_ref: i32[S * P']
    # (the padded page table, flat); k_ref, v_ref: [num_kv_heads * num_pages * page_size, D] (every head's rows,
    # flat). Program (head, p) takes one item of each round of `programs` below the real count, in snake order
    # (p in even rounds, programs - 1 - p in odd ones), so that the longest items do not all fall to one program.
    head, pid = pl.program_id(0), pl.program_id(1)
    real = real_ref[0]

    def item(i, carry):
        # (i & 1, not i % 2: Pallas' Triton lowering of an integer remainder by a constant failed, i32 vs i1)
        w = i * num_programs + jnp.where((i & 1) == 0, pid, num_programs - 1 - pid)

        @pl.when(w < real)
        def _():
            seq = item_ref[w, 0]
            _prefill_item(item_ref[w, 1], item_ref[w, 2], item_ref[w, 3], head, pt_ref, q_ref, k_ref, v_ref,
                          o_refs[-1], page_size=page_size, pt_base=seq * pages_per_seq, pt_len=pages_per_seq,
                          row_base=head * (num_pages * page_size), num_pages=num_pages, **kw)
        return carry

    lax.fori_loop(0, pl.cdiv(real, num_programs), item, 0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "interpret",
                                             "blocks", "min_q_len"))
def ragged_prefill_attention_kernel(
    q: jax.Array,            # [T, num_q_heads, head_dim]
    k_pages: jax.Array,      # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,
    kv_lens: jax.Array,      # i32[S]
    page_table: jax.Array,   # i32[S, P]
    cu_q_lens: jax.Array,    # i32[S+1]
    *, sm_scale: float, sliding_window: int | None = None, interpret: bool = False,
    blocks: PrefillBlockSizes | None = None, min_q_len: int = 0, out: jax.Array | None = None,
) -> jax.Array:              # [T, num_q_heads, head_dim]; rows of skipped sequences undefined
    """``out`` ([T, H, D] like ``q``): the result is ``out`` with the chunks' rows written, every
    other row as it was (the kernel stores into ``out``'s buffer, aliased: no copy when the caller
    gives it up); without it those rows are undefined."""
    if out is not None and out.shape != q.shape:
        raise ValueError(f"out must have q's shape {q.shape}, not {out.shape}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    num_seqs, pages_per_seq = page_table.shape
    group = num_q_heads // num_kv_heads
    blocks = blocks or prefill_block_sizes(head_dim, page_size)
    group_p = pl.next_power_of_2(group)
    block_q = max(1, blocks.block_rows // group_p)
    ppb = min(blocks.pages_per_block, pl.next_power_of_2(pages_per_seq))
    padded_pages = pl.cdiv(pages_per_seq, ppb) * ppb
    num_items = pl.cdiv(num_tokens, block_q) + num_seqs

    items = work_items(cu_q_lens, kv_lens, block_q=block_q, num_items=num_items,
                       min_q_len=min_q_len)
    pt = page_table.astype(jnp.int32)
    if padded_pages != pages_per_seq:
        pt = jnp.pad(pt, ((0, 0), (0, padded_pages - pages_per_seq)))
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    static = dict(sm_scale=sm_scale, pages_per_block=ppb, block_q=block_q, group=group, group_rows=group_p,
                  sliding_window=sliding_window, precision=precision, interpret=interpret, gather=blocks.gather,
                  dtype=compute_dtype(q.dtype, k_pages.dtype))
    whole = whole_block((num_tokens, num_q_heads, head_dim))
    if blocks.persistent_programs > 0:
        kv_spec, k_in, v_in = flat_kv_operands(k_pages, v_pages, blocks.gather)
        programs = max(1, min(num_items, blocks.persistent_programs // num_kv_heads))
        real = jnp.sum(items[:, 2] > 0).astype(jnp.int32).reshape(1)   # the real items come first
        in_specs = [whole_block((1,)), whole_block((num_items, 4)), whole_block((num_seqs * padded_pages,)), whole,
                    kv_spec, kv_spec]
        operands = [real, items, pt.reshape(-1), q, k_in, v_in]
        kernel = functools.partial(_prefill_kernel_persistent, num_programs=programs, pages_per_seq=padded_pages,
                                   num_pages=num_pages, page_size=page_size, **static)
        grid = (num_kv_heads, programs)
    else:
        kernel = functools.partial(_prefill_kernel, page_size=page_size, **static)
        # Grid (kv head, item): the GPU launches blocks in the order of grid axis 0 first, so the
        # kv heads of one item start together and the items, listed longest first, start in that order
        # (largest work first). With the item axis first, the heads' items would start one head after
        # another, and the long items of the last heads would start last: a lone causal chunk's tail
        # ran ~1.5x its even share (list scheduling of 512 programs on 264 slots).
        kv_spec, k_in, v_in = kv_operands(k_pages, v_pages, blocks.gather, head_axis=0)
        in_specs = [pl.BlockSpec((None, 4), lambda h, i: (i, 0)),
                    pl.BlockSpec((None, padded_pages), lambda h, i: (i, 0)),
                    whole, kv_spec, kv_spec]
        operands = [items, pt[items[:, 0]], q, k_in, v_in]                 # the page table a row an item
        grid = (num_kv_heads, num_items)
    aliases = {}
    if out is not None:
        in_specs.append(whole)
        aliases = {len(operands): 0}
        operands.append(out)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim),
                                       q.dtype if out is None else out.dtype),
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        input_output_aliases=aliases,
        name="ragged_prefill_attention",
    )(*operands)
