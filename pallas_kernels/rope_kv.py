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


def _split(qkv: jax.Array, num_q_heads: int, num_kv_heads: int):
    t, width = qkv.shape
    d = width // (num_q_heads + 2 * num_kv_heads)
    x = qkv.reshape(t, num_q_heads + 2 * num_kv_heads, d)
    return (x[:, :num_q_heads], x[:, num_q_heads:num_q_heads + num_kv_heads], x[:, num_q_heads + num_kv_heads:])


def rope_write_kv_reference(qkv, cos, sin, k_pages, v_pages, slot_page, slot_offset, *, num_q_heads: int,
                            num_kv_heads: int):
    """(q [T, Hq, D] rotated, k_pages, v_pages with this step's k rotated and v written): ``apply_rope`` and
    ``write_pages`` as the model's unfused layer runs them."""
    q, k, v = _split(qkv, num_q_heads, num_kv_heads)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_pages, v_pages = write_pages(k_pages, v_pages, k, v, slot_page, slot_offset)
    return q, k_pages, v_pages


def _rotated(ref, token, first: int, heads: int, half: int, c, s):
    """(first half, second half) of heads ``first ..`` of ``token`` rotated: ``apply_rope``'s products and sums."""
    x1 = ref[token, pl.ds(first, heads), pl.ds(0, half)]
    x2 = ref[token, pl.ds(first, heads), pl.ds(half, half)]
    return x1 * c + (-x2) * s, x2 * c + x1 * s


def _kernel(page_ref, offset_ref, x_ref, cos_ref, sin_ref, k_in_ref, v_in_ref, q_ref, k_ref, v_ref, *,
            num_q_heads: int, num_kv_heads: int, half: int, num_pages: int, page_size: int):
    del k_in_ref, v_in_ref           # aliased to k_ref, v_ref
    t = pl.program_id(0)
    c = cos_ref[t, pl.ds(0, half)][None, :]
    s = sin_ref[t, pl.ds(0, half)][None, :]
    q1, q2 = _rotated(x_ref, t, 0, num_q_heads, half, c, s)
    q_ref[t, :, pl.ds(0, half)] = q1
    q_ref[t, :, pl.ds(half, half)] = q2
    page = page_ref[t]
    off = offset_ref[t]
    ok = (page >= 0) & (page < num_pages) & (off >= 0) & (off < page_size)
    page = jnp.clip(page, 0, num_pages - 1)     # the address stays in range where nothing is stored
    off = jnp.clip(off, 0, page_size - 1)
    k1, k2 = _rotated(x_ref, t, num_q_heads, num_kv_heads, half, c, s)
    v1 = x_ref[t, pl.ds(num_q_heads + num_kv_heads, num_kv_heads), pl.ds(0, half)]
    v2 = x_ref[t, pl.ds(num_q_heads + num_kv_heads, num_kv_heads), pl.ds(half, half)]
    mask = jnp.broadcast_to(ok, (num_kv_heads, half))
    for ref, val, col in ((k_ref, k1, 0), (k_ref, k2, half), (v_ref, v1, 0), (v_ref, v2, half)):
        val = to_pages_dtype(val, ref.dtype)
        pltriton.store(ref.at[:, page, off, pl.ds(col, half)], val, mask=mask)


@functools.partial(jax.jit, static_argnames=("num_q_heads", "num_kv_heads", "num_warps", "interpret"))
def rope_write_kv_kernel(qkv, cos, sin, k_pages, v_pages, slot_page, slot_offset, *, num_q_heads: int,
                         num_kv_heads: int, num_warps: int | None = None, interpret: bool = False):
    """The kernel: a program a token, ``num_warps`` each (default NUM_WARPS). Returns the reference's triple."""
    t = qkv.shape[0]
    _, num_pages, page_size, d = k_pages.shape
    x = qkv.reshape(t, num_q_heads + 2 * num_kv_heads, d)
    half = d // 2
    kernel = functools.partial(_kernel, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, half=half,
                               num_pages=num_pages, page_size=page_size)
    q, k_pages, v_pages = pl.pallas_call(
        kernel, grid=(t,),
        in_specs=[whole_block((t,)), whole_block((t,)), whole_block(x.shape), whole_block(cos.shape),
                  whole_block(sin.shape), whole_block(k_pages.shape), whole_block(v_pages.shape)],
        out_specs=[whole_block((t, num_q_heads, d)), whole_block(k_pages.shape), whole_block(v_pages.shape)],
        out_shape=[jax.ShapeDtypeStruct((t, num_q_heads, d), qkv.dtype),
                   jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        input_output_aliases={5: 1, 6: 2},
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps or NUM_WARPS,
                                                                        num_stages=1),
        name="rope_write_kv",
    )(slot_page.astype(jnp.int32), slot_offset.astype(jnp.int32), x, cos, sin, k_pages, v_pages)
    return q, k_pages, v_pages


def kernel_supports(num_q_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes these shapes: Triton's tiles are powers of two (the heads and half a head's
    width)."""
    def pow2(n):
        return n > 0 and n & (n - 1) == 0
    return pow2(num_q_heads) and pow2(num_kv_heads) and head_dim % 2 == 0 and pow2(head_dim // 2)


def rope_write_kv(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                  slot_page: jax.Array, slot_offset: jax.Array, *, num_q_heads: int, num_kv_heads: int,
                  impl: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """``qkv [T, (Hq + 2 Hk) * D]`` (q's heads, k's, v's), ``cos``, ``sin`` [T, D] (``apply_rope``'s rotate-half
    layout, both halves equal: the kernel reads the first), the pages [Hk, pages, page_size, D] and each token's slot
    (``slot_page``, ``slot_offset`` [T]; a slot out of range: nothing written) -> (q rotated [T, Hq, D], k_pages,
    v_pages with the tokens' rotated keys and their values written in the pages' dtype). ``impl``: ``auto`` (the
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
    supported = kernel_supports(num_q_heads, num_kv_heads, d)
    if impl == "auto":
        impl = "kernel" if on_gpu() and supported else "reference"
    if impl == "reference":
        return rope_write_kv_reference(qkv, cos, sin, k_pages, v_pages, slot_page, slot_offset,
                                       num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
    if not supported:
        raise ValueError(f"the kernel takes powers of two of heads and of half a head, not {num_q_heads} "
                         f"q heads, {num_kv_heads} kv heads of width {d}")
    return rope_write_kv_kernel(qkv, cos, sin, k_pages, v_pages, slot_page, slot_offset, num_q_heads=num_q_heads,
                                num_kv_heads=num_kv_heads, interpret=impl == "interpret")
