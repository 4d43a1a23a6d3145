"""Attention of a ragged batch of query tokens over a paged KV cache.

One call serves a step that mixes prefill chunks and decode tokens: the query
tokens of all sequences are packed in one array, sequence ``s`` owning rows
``cu_q_lens[s]:cu_q_lens[s+1]``. Its keys are the first ``kv_lens[s]`` tokens
stored in pages ``page_table[s, :]`` (the new tokens of this step already
written), and its ``q_len`` queries are the *last* ``q_len`` of those
``kv_lens[s]`` positions, so a chunk attends to its earlier pages and causally
within itself, and a decode token (q_len 1) to everything before it.

KV layout (see jaxdyn/kv/cache.py): ``k_pages, v_pages: [num_kv_heads,
num_pages, page_size, head_dim]``. Query head ``h`` reads kv head
``h // (num_q_heads // num_kv_heads)`` (GQA / MQA).

This module holds the plain ``jax.numpy`` reference and ``ragged_paged_attention``,
the one entry point the model calls: on GPU it runs the Pallas kernels of
``paged_decode.py`` (single decode tokens) and ``ragged_prefill.py`` (chunks).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.paged_decode import (decode_block_sizes, grid_splits, kernel_zeros, on_gpu,
                                         paged_decode_attention_kernel)
from pallas_kernels.ragged_prefill import prefill_block_sizes, ragged_prefill_attention_kernel

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Query rows handled at once by the reference: bounds its gathered-KV temporary
# to this many rows times one sequence's context.
_REFERENCE_Q_BLOCK = 64


def ragged_paged_attention_reference(
    q: jax.Array,            # [T, num_q_heads, head_dim]
    k_pages: jax.Array,      # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,      # [num_kv_heads, num_pages, page_size, head_dim]
    kv_lens: jax.Array,      # i32[S]   tokens in the cache per sequence, this step's included
    page_table: jax.Array,   # i32[S, P] page ids of each sequence, in order
    cu_q_lens: jax.Array,    # i32[S+1] query row offsets; padding sequences have q_len 0
    *,
    sm_scale: float,
    sliding_window: int | None = None,
) -> jax.Array:              # [T, num_q_heads, head_dim]; rows past cu_q_lens[-1] are 0
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    num_seqs, pages_per_seq = page_table.shape
    group = num_q_heads // num_kv_heads
    max_len = pages_per_seq * page_size

    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, rows, side="right") - 1, 0, num_seqs - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    valid = rows < cu_q_lens[num_seqs]
    q_pos = kv_lens[seq] - q_len + (rows - cu_q_lens[seq])       # [T]

    def one_row(args):
        q_row, s_row, pos = args                                  # [H, D], (), ()
        pages = page_table[s_row]                                 # [P]
        k = k_pages[:, pages].reshape(num_kv_heads, max_len, head_dim)
        v = v_pages[:, pages].reshape(num_kv_heads, max_len, head_dim)
        qg = q_row.reshape(num_kv_heads, group, head_dim).astype(jnp.float32)
        s = jnp.einsum("kgd,kld->kgl", qg, k.astype(jnp.float32)) * sm_scale
        key_pos = jnp.arange(max_len, dtype=jnp.int32)
        mask = key_pos <= pos
        if sliding_window is not None:
            mask &= key_pos > pos - sliding_window
        s = jnp.where(mask[None, None, :], s, _MASK_VALUE)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("kgl,kld->kgd", p, v.astype(jnp.float32))
        return o.reshape(num_q_heads, head_dim)

    # lax.map vmaps one_row over blocks of rows, bounding the gathered-KV temporary.
    out = jax.lax.map(one_row, (q, seq, q_pos), batch_size=min(num_tokens, _REFERENCE_Q_BLOCK))
    out = jnp.where(valid[:, None, None], out, 0.0)
    return out.astype(q.dtype)


@functools.partial(jax.named_call, name="ragged_paged_attention")
def decode_part(q, k_pages, v_pages, kv_lens, page_table, q_rows, *, sm_scale: float,
                sliding_window: int | None = None, interpret: bool = False, in_place: bool = True,
                attention_programs: int = 0, fp8_products: str = "off", decode_chunks: int | None = None
                ) -> tuple[jax.Array, bool]:
    """The entry point's decode kernel call (``kv_lens`` 0 for every sequence it does not decode; sequence ``s``'s
    query at row ``q_rows[s]``): (out, stored). With ``in_place`` and one context split (``grid_splits``: a call
    of many sequence slots) the kernel stores each decoded query's rows into zeros shaped like ``q`` (stored
    True; ``attention_programs`` > 0: its persistent programs); with ``in_place`` and context splits (a call of
    few slots) a second kernel merges the splits' partial results into rows shaped like ``q``, zeros elsewhere
    (stored True: ``merge_splits_into_rows``); otherwise it returns [S, H, D] rows, the splits' partial results
    combined (stored False). ``fp8_products``: the blocks' ``DecodeBlockSizes.fp8_products``;
    ``decode_chunks``: their ``balance_chunks`` (None: the tuned blocks')."""
    num_seqs = kv_lens.shape[0]
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    blocks = dataclasses.replace(decode_block_sizes(head_dim, page_size, k_pages.dtype, num_seqs),
                                 fp8_products=fp8_products)
    if decode_chunks is not None:
        blocks = dataclasses.replace(blocks, balance_chunks=decode_chunks)
    kw = dict(q_rows=q_rows, sm_scale=sm_scale, sliding_window=sliding_window, interpret=interpret)
    if in_place and grid_splits(num_seqs, num_kv_heads, page_table.shape[1], blocks) == 1:
        return paged_decode_attention_kernel(
            q, k_pages, v_pages, kv_lens, page_table, out=kernel_zeros(q.shape, q.dtype, q_rows[0], tie=q),
            blocks=dataclasses.replace(blocks, persistent_programs=attention_programs), **kw), True
    if in_place:        # context splits: one kernel merges them into q-shaped rows, zeros elsewhere
        return paged_decode_attention_kernel(q, k_pages, v_pages, kv_lens, page_table, blocks=blocks,
                                             merged_rows=True, **kw), True
    return paged_decode_attention_kernel(q, k_pages, v_pages, kv_lens, page_table, blocks=blocks, **kw), False


def prefill_part(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, *, sm_scale: float,
                 sliding_window: int | None = None, interpret: bool = False, attention_programs: int = 0,
                 out: jax.Array | None = None) -> jax.Array:
    """The entry point's prefill kernel call: the chunks of more than one query token (``min_q_len=1``), stored
    into ``out`` (rows of other sequences as they were) or, without it, into rows left undefined elsewhere."""
    _, _, page_size, head_dim = k_pages.shape
    blocks = dataclasses.replace(prefill_block_sizes(head_dim, page_size), persistent_programs=attention_programs)
    return ragged_prefill_attention_kernel(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, sm_scale=sm_scale, sliding_window=sliding_window,
        interpret=interpret, min_q_len=1, out=out, blocks=blocks)


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    impl: str = "auto",
    in_place: bool = True,
    attention_programs: int = 0,
    skip_idle_prefill: bool = False,
    fp8_products: str = "off",
    decode_chunks: int | None = None,
    prefill_programs: int | None = None,
) -> jax.Array:
    """The entry point the model calls; same contract as the reference.

    ``impl``: ``auto`` (the Pallas kernels on GPU, the reference elsewhere),
    ``kernel``, ``interpret`` (the kernels through Pallas interpret mode, for CPU
    tests) or ``reference``. With kernels, sequences with one query token go to
    the decode kernel and longer chunks to the ragged prefill kernel. Each row
    of the output is taken from the kernel that owns its sequence: with
    ``in_place`` both store into one zeroed output, each its own rows (no merge,
    and the decode kernel writes its query heads' rows only, not the 16-row
    tiles of its matrix products); where the decode kernel splits contexts (a
    call of few sequence slots) a merge kernel writes that output (the merged
    decode rows, zeros elsewhere) before the prefill kernel stores into it;
    otherwise each kernel writes an output of its own and one select merges them.
    ``attention_programs`` > 0: the in-place decode kernel runs that many programs, each looping over
    (sequence, kv head) items (``DecodeBlockSizes.persistent_programs``), and the prefill kernel that many
    over its kv heads, each looping over the step's real items (``PrefillBlockSizes.persistent_programs``):
    a bucket's empty sequence slots and padding items then cost no program each; 0: a program an item.
    ``prefill_programs``: the prefill kernel's alone (None: ``attention_programs``), e.g. its programs looping over
    the step's real items with the decode kernel a program an item.
    ``skip_idle_prefill``: the prefill kernel runs under a ``lax.cond`` on the device, only when some sequence has
    more than one query token; a decode-only step then starts none of its programs (the same result).
    ``fp8_products`` ("off", "qk", "qk_pv"): over fp8 pages with a 16-bit query, the decode kernel's products on
    e4m3 operands (``DecodeBlockSizes.fp8_products``); the reference and the prefill kernel are unchanged.
    ``decode_chunks``: the in-place decode kernel's ``DecodeBlockSizes.balance_chunks`` (long contexts split into
    up to that many chunks; None: the tuned blocks').
    """
    if impl == "auto":
        impl = "kernel" if on_gpu() else "reference"
    if impl == "reference":
        return ragged_paged_attention_reference(
            q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
            sm_scale=sm_scale, sliding_window=sliding_window)
    if impl not in ("kernel", "interpret"):
        raise ValueError(f"impl must be auto, kernel, interpret or reference, not {impl!r}")
    interpret = impl == "interpret"
    num_tokens = q.shape[0]
    num_seqs = kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    is_decode = q_lens == 1
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, interpret=interpret,
              attention_programs=attention_programs)
    prefill_kw = dict(kw, attention_programs=attention_programs if prefill_programs is None else prefill_programs)

    def prefill(out=None):
        return prefill_part(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, out=out, **prefill_kw)

    def maybe_prefill(idle, out=None):
        # skip_idle_prefill: the prefill kernel only where some sequence has a chunk (its work: min_q_len=1)
        return lax.cond(jnp.any(q_lens > 1), prefill, idle, out) if skip_idle_prefill else prefill(out)

    # padding rows stay 0 in place; the decode kernel writes its sequences' rows, the prefill kernel the chunks'
    decode_out, stored = decode_part(q, k_pages, v_pages, jnp.where(is_decode, kv_lens, 0), page_table,
                                     jnp.where(is_decode, cu_q_lens[:-1], 0), in_place=in_place,
                                     fp8_products=fp8_products, decode_chunks=decode_chunks, **kw)
    if stored:
        return maybe_prefill(lambda out: out, decode_out)
    # [T, H, D]; a decode-only step's rows all come from the decode kernel, so zeros stand in for a skipped one
    prefill_out = maybe_prefill(lambda out: kernel_zeros(q.shape, q.dtype, cu_q_lens[0]))
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    # the sequence of each row: one fused comparison (searchsorted is a loop of kernels on GPU)
    seq = jnp.clip((cu_q_lens[None, 1:] <= rows[:, None]).sum(axis=1), 0, num_seqs - 1)
    valid = rows < cu_q_lens[num_seqs]
    out = jnp.where(is_decode[seq][:, None, None], decode_out[seq], prefill_out)
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
