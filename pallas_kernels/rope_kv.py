"""Rotary embedding of a step's queries and keys and the write of its keys and values into their KV pages, in one
kernel.

A decoder layer's attention takes q, k and v from one product (``qkv [T, (Hq + 2 Hk) * D]``: the q heads, then k's,
then v's), rotates q and k (rotate-half, as Hugging Face's Llama), and writes k and v into the paged cache at each
token's slot (page, offset), in the pages' dtype (fp8 pages saturate at +-448). XLA made three kernels a layer of
that: q's rotation (a concatenate fusion), k's rotation, conversion and scatter (one scatter fusion) and v's scatter,
each a launch of 2-3 µs at a 16-token step of the 8B shape (``benchmarks/gpu/profile_run.py``, twenty-eighth
session): about 0.2 ms a step. Here one program takes one token: its q heads rotated into the output, its k heads
rotated, converted and stored at its slot, its v heads converted and stored; a token whose page is out of range
(padding: ``num_pages``) stores no key or value, as ``write_kv``'s scatter drops it.

With ``scales`` (an fp8 layer's product: ``qkv`` its raw result, before its rows' and channels' scales) the kernel
scales each value as it reads it, in float32 and rounded once to ``qkv``'s dtype (``scale_product``, what XLA's
separate kernel made of it: 17 µs a layer at 2,048 rows and a launch at every step on an H200,
``benchmarks/results/gpu_suite_h200.md``, fortieth session). A program then takes a block of tokens
(``tokens_per_program``: up to 16, keeping at least 132 programs) and reads the channels' scales once for them: with a
program a token (session 40's form, measured no faster than XLA's kernel on an H100) each token read its 6,144
channels' float32 scales, twice its own bf16 row.

The values are ``rope_write_kv_reference``'s (``apply_rope`` op for op: each product and the sum rounded to the
input's dtype, as Hugging Face's bf16 operations round them), bit for bit in interpret mode; XLA, compiling the
unfused operations for a GPU, rotates in float32 and rounds once (``xla_allow_excess_precision``), so there a
rotated value can be a bf16 step apart. The pages are updated in place (the kernel's outputs alias them).
``rope_write_kv`` is the entry point: the kernel on GPU, Pallas interpret mode (CPU tests) or the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_decode import on_gpu, whole_block

FP8_PAGES_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
FP8_PAGES_MAX = float(jnp.finfo(FP8_PAGES_DTYPE).max)     # 448
NUM_WARPS = 4


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim] in the rotate-half layout (both halves equal)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def to_pages_dtype(x: jax.Array, dtype) -> jax.Array:
    """``x`` in the pages' ``dtype``: fp8 saturates at +-448 (e4m3 has no infinity, a cast of a larger value
    would be NaN), NaN staying NaN."""
    if x.dtype == jnp.dtype(dtype):
        return x
    if jnp.dtype(dtype) == FP8_PAGES_DTYPE:
        if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).max >= FP8_PAGES_MAX):
            x = x.astype(jnp.float32)
        # 448 is exact in bf16, f16 and f32; selects, not clip: Triton's max / min (the kernel's) drop a NaN
        x = jnp.where(x > FP8_PAGES_MAX, FP8_PAGES_MAX, jnp.where(x < -FP8_PAGES_MAX, -FP8_PAGES_MAX, x))
    return x.astype(dtype)


def write_pages(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_page: jax.Array,
                slot_offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``k``, ``v`` [T, kv_heads, D] scattered into ``k_pages``, ``v_pages`` [kv_heads, pages, page_size, D] at
    (``slot_page``, ``slot_offset``) [T], in the pages' dtype; slots out of range (padding: page ``num_pages``; a
    negative page or an offset outside the page) dropped.

    The slots a step writes are distinct (a token's slot is its own; a shared page is copied before it is
    written), so the scatter is declared unique: XLA writes the rows in parallel instead of serialising possible
    collisions (on an H200, 19 µs a layer's K or V at 2,048 rows before)."""
    num_pages, page_size = k_pages.shape[1:3]
    # a negative slot would count from the end (``.at``'s indexing): out of range like padding's
    dropped = (slot_page < 0) | (slot_offset < 0) | (slot_offset >= page_size)
    slot_page = jnp.where(dropped, num_pages, slot_page)
    k = to_pages_dtype(jnp.swapaxes(k, 0, 1), k_pages.dtype)   # [kv_heads, T, D]
    v = to_pages_dtype(jnp.swapaxes(v, 0, 1), v_pages.dtype)
    k_pages = k_pages.at[:, slot_page, slot_offset].set(k, mode="drop", unique_indices=True)
    v_pages = v_pages.at[:, slot_page, slot_offset].set(v, mode="drop", unique_indices=True)
    return k_pages, v_pages


def scale_product(raw: jax.Array, row_scale: jax.Array, col_scale: jax.Array) -> jax.Array:
    """An fp8 product's raw result ``raw [T, W]`` times its rows' (``row_scale [T]``) and channels' (``col_scale
    [W]``) scales in float32, rounded once to ``raw``'s dtype (the model's ``fp8_scale``, operation for operation)."""
    return (raw.astype(jnp.float32) * (row_scale[:, None] * col_scale[None, :])).astype(raw.dtype)


def _split(qkv: jax.Array, num_q_heads: int, num_kv_heads: int):
    t, width = qkv.shape
    d = width // (num_q_heads + 2 * num_kv_heads)
    x = qkv.reshape(t, num_q_heads + 2 * num_kv_heads, d)
    return (x[:, :num_q_heads], x[:, num_q_heads:num_q_heads + num_kv_heads], x[:, num_q_heads + num_kv_heads:])


def rope_write_kv_reference(qkv, cos, sin, k_pages, v_pages, slot_page, slot_offset, *, num_q_heads: int,
                            num_kv_heads: int, scales=None):
    """(q [T, Hq, D] rotated, k_pages, v_pages with this step's k rotated and v written): ``apply_rope`` and
    ``write_pages`` as the model's unfused layer runs them (after ``scale_product`` with ``scales``)."""
    if scales is not None:
        qkv = scale_product(qkv, *scales)
    q, k, v = _split(qkv, num_q_heads, num_kv_heads)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_pages, v_pages = write_pages(k_pages, v_pages, k, v, slot_page, slot_offset)
    return q, k_pages, v_pages


def _read(ref, token, first: int, heads: int, col: int, half: int, scaled=None):
    """Half ``col ..`` of heads ``first ..`` of ``token``, scaled as ``scale_product`` scales it where ``scaled``
    (the row's scale, that half's channel scales [heads, half]) is given."""
    x = ref[token, pl.ds(first, heads), pl.ds(col, half)]
    if scaled is None:
        return x
    row, channels = scaled
    return (x.astype(jnp.float32) * (row * channels)).astype(x.dtype)


def _kernel(page_ref, offset_ref, x_ref, cos_ref, sin_ref, *refs, num_q_heads: int, num_kv_heads: int, half: int,
            num_pages: int, page_size: int, scaled: bool, tokens: int):
    if scaled:
        row_ref, col_ref, _, _, q_ref, k_ref, v_ref = refs     # the pages' inputs aliased to k_ref, v_ref
    else:
        _, _, q_ref, k_ref, v_ref = refs
    hk = num_kv_heads
    # (first head, heads, column) of each half read: q's two halves, k's, v's
    parts = ((0, num_q_heads, 0), (0, num_q_heads, half), (num_q_heads, hk, 0), (num_q_heads, hk, half),
             (num_q_heads + hk, hk, 0), (num_q_heads + hk, hk, half))
    # the channels' scales, read once for the program's tokens (a token's own row is 2 bytes a channel, the scales 4)
    channels = [col_ref[pl.ds(first, heads), pl.ds(col, half)] if scaled else None for first, heads, col in parts]

    first_token = pl.program_id(0) * tokens     # (read outside the loop: interpret mode has no program_id in it)

    def token(i, carry):
        t = first_token + i
        row = row_ref[t] if scaled else None
        x = [_read(x_ref, t, first, heads, col, half, None if ch is None else (row, ch))
             for (first, heads, col), ch in zip(parts, channels)]
        c = cos_ref[t, pl.ds(0, half)][None, :]
        s = sin_ref[t, pl.ds(0, half)][None, :]
        # apply_rope's products and sums: (x1 c - x2 s, x2 c + x1 s)
        q_ref[t, :, pl.ds(0, half)] = x[0] * c + (-x[1]) * s
        q_ref[t, :, pl.ds(half, half)] = x[1] * c + x[0] * s
        k1, k2 = x[2] * c + (-x[3]) * s, x[3] * c + x[2] * s
        page = page_ref[t]
        off = offset_ref[t]
        ok = (page >= 0) & (page < num_pages) & (off >= 0) & (off < page_size)
        page = jnp.clip(page, 0, num_pages - 1)     # the address stays in range where nothing is stored
        off = jnp.clip(off, 0, page_size - 1)
        mask = jnp.broadcast_to(ok, (hk, half))
        for ref, val, col in ((k_ref, k1, 0), (k_ref, k2, half), (v_ref, x[4], 0), (v_ref, x[5], half)):
            val = to_pages_dtype(val, ref.dtype)
            pltriton.store(ref.at[:, page, off, pl.ds(col, half)], val, mask=mask)
        return carry

    if tokens == 1:
        token(0, 0)
    else:
        jax.lax.fori_loop(0, tokens, token, 0)


# Programs wanted for a scaled call: one an SM of an H100 / H200 (132 SMs) at least; a program takes up to
# SCALED_MAX_TOKENS tokens so that its channels' scales (4 bytes a channel, read once a program) cost a small
# share of its tokens' rows (2 bytes a channel a token): 8 tokens a program at 2,048 tokens, 1 at 16
_TARGET_PROGRAMS = 132
SCALED_MAX_TOKENS = 16


def tokens_per_program(t: int, scaled: bool) -> int:
    """Tokens a program takes in a call of ``t`` tokens: 1 without scales; with them the largest power of two
    dividing ``t`` that leaves at least ``_TARGET_PROGRAMS`` programs, at most SCALED_MAX_TOKENS."""
    n = 1
    while scaled and n < SCALED_MAX_TOKENS and t % (2 * n) == 0 and t // (2 * n) >= _TARGET_PROGRAMS:
        n *= 2
    return n


@functools.partial(jax.jit, static_argnames=("num_q_heads", "num_kv_heads", "num_warps", "interpret", "tokens"))
def rope_write_kv_kernel(qkv, cos, sin, k_pages, v_pages, slot_page, slot_offset, scales=None, *, num_q_heads: int,
                         num_kv_heads: int, num_warps: int | None = None, interpret: bool = False,
                         tokens: int | None = None):
    """The kernel: ``tokens`` a program (default ``tokens_per_program``; it must divide T), ``num_warps`` each
    (default NUM_WARPS). Returns the reference's triple."""
    t = qkv.shape[0]
    _, num_pages, page_size, d = k_pages.shape
    tokens = tokens or tokens_per_program(t, scales is not None)
    if t % tokens:
        raise ValueError(f"{tokens} tokens a program do not divide {t}")
    x = qkv.reshape(t, num_q_heads + 2 * num_kv_heads, d)
    half = d // 2
    kernel = functools.partial(_kernel, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, half=half,
                               num_pages=num_pages, page_size=page_size, scaled=scales is not None, tokens=tokens)
    scale_args = () if scales is None else (scales[0].astype(jnp.float32),
                                            scales[1].astype(jnp.float32).reshape(x.shape[1:]))
    pages_at = 5 + len(scale_args)
    q, k_pages, v_pages = pl.pallas_call(
        kernel, grid=(t // tokens,),
        in_specs=[whole_block((t,)), whole_block((t,)), whole_block(x.shape), whole_block(cos.shape),
                  whole_block(sin.shape), *(whole_block(a.shape) for a in scale_args), whole_block(k_pages.shape),
                  whole_block(v_pages.shape)],
        out_specs=[whole_block((t, num_q_heads, d)), whole_block(k_pages.shape), whole_block(v_pages.shape)],
        out_shape=[jax.ShapeDtypeStruct((t, num_q_heads, d), qkv.dtype),
                   jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        input_output_aliases={pages_at: 1, pages_at + 1: 2},
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps or NUM_WARPS,
                                                                        num_stages=1),
        name="rope_write_kv",
    )(slot_page.astype(jnp.int32), slot_offset.astype(jnp.int32), x, cos, sin, *scale_args, k_pages, v_pages)
    return q, k_pages, v_pages


def kernel_supports(num_q_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes these shapes: Triton's tiles are powers of two (the heads and half a head's
    width)."""
    def pow2(n):
        return n > 0 and n & (n - 1) == 0
    return pow2(num_q_heads) and pow2(num_kv_heads) and head_dim % 2 == 0 and pow2(head_dim // 2)


def rope_write_kv(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                  slot_page: jax.Array, slot_offset: jax.Array, *, num_q_heads: int, num_kv_heads: int,
                  scales: tuple[jax.Array, jax.Array] | None = None,
                  impl: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """``qkv [T, (Hq + 2 Hk) * D]`` (q's heads, k's, v's), ``cos``, ``sin`` [T, D] (``apply_rope``'s rotate-half
    layout, both halves equal: the kernel reads the first), the pages [Hk, pages, page_size, D] and each token's slot
    (``slot_page``, ``slot_offset`` [T]; a slot out of range: nothing written) -> (q rotated [T, Hq, D], k_pages,
    v_pages with the tokens' rotated keys and their values written in the pages' dtype). ``scales``: (the rows'
    [T], the channels' [W]) float32 scales of an fp8 product whose raw result ``qkv`` is, applied first
    (``scale_product``). ``impl``: ``auto`` (the
    kernel on GPU where ``kernel_supports`` the shapes, else the reference), ``kernel``, ``interpret`` or
    ``reference``."""
    if impl not in ("auto", "kernel", "interpret", "reference"):
        raise ValueError(f"impl must be auto, kernel, interpret or reference, not {impl!r}")
    t, width = qkv.shape
    kvh, _, _, d = k_pages.shape
    if kvh != num_kv_heads or width != (num_q_heads + 2 * num_kv_heads) * d:
        raise ValueError(f"qkv {qkv.shape} does not hold {num_q_heads} q heads and {num_kv_heads} k and v heads "
                         f"of the pages' width {d} (pages {k_pages.shape})")
    if cos.shape != (t, d) or sin.shape != (t, d) or slot_page.shape != (t,) or slot_offset.shape != (t,):
        raise ValueError(f"cos, sin must be [{t}, {d}] and the slots [{t}], got {cos.shape}, {sin.shape}, "
                         f"{slot_page.shape}, {slot_offset.shape}")
    if scales is not None and (len(scales) != 2 or scales[0].shape != (t,) or scales[1].shape != (width,)):
        raise ValueError(f"scales must be the rows' [{t}] and the channels' [{width}], got "
                         f"{[getattr(a, 'shape', a) for a in scales]}")
    supported = kernel_supports(num_q_heads, num_kv_heads, d)
    if impl == "auto":
        impl = "kernel" if on_gpu() and supported else "reference"
    if impl == "reference":
        return rope_write_kv_reference(qkv, cos, sin, k_pages, v_pages, slot_page, slot_offset,
                                       num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, scales=scales)
    if not supported:
        raise ValueError(f"the kernel takes powers of two of heads and of half a head, not {num_q_heads} "
                         f"q heads, {num_kv_heads} kv heads of width {d}")
    return rope_write_kv_kernel(qkv, cos, sin, k_pages, v_pages, slot_page, slot_offset, scales,
                                num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, interpret=impl == "interpret")
