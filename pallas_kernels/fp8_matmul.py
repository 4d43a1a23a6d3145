"""Few-row products with fp8 weights: ``(x @ dequant(w).T) * scale`` streaming the weights once (Pallas, GPU).

A decode step of few sequences reads every weight once for a handful of rows: its products are bound by the
weights' read. cuBLASLt's fp8 x fp8 product read the 8B shape's fp8 weights at about 1.6 TB/s at 16 rows on an
H200 (``benchmarks/gpu/fp8_probe.py``, half the copy rate), after a reduction and a quantization of the
activations a product. This kernel takes the activations as they are (bf16) and each fp8 weight tile is made
bf16 in registers as it arrives (w8a16: e4m3 values are exact in bf16), so a step's fp8 products read only the
weights, with no activation quantization in front of them.

``w`` is ``[N, K]`` (``Linear``'s fp8 layout: the contracting dimension minor) with a float32 ``scale`` per
output channel. Each program owns ``block_n`` output channels (and a ``1/split_k`` share of K, when the
channels alone give too few programs to keep every SM's loads in flight) and streams its ``[block_n, K]``
strip of weights ``block_k`` columns at a time through Triton's software pipeline (``num_stages`` loads in
flight), accumulating ``[M, block_n]`` in float32. With ``split_k > 1`` the programs write float32 partial
sums that one small fusion adds, scales and rounds.

``fp8_weight_matmul`` is the entry point: the kernel on GPU, Pallas interpret mode (CPU tests) or the
``jax.numpy`` reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_decode import _MIN_ROWS, on_gpu   # the smallest M of a Triton dot tile

# The most rows the kernel takes: its row tiles sit in shared memory once per pipeline stage (128 x 256 bf16 x 4
# stages = 256 KiB is already past an H100's 228 KiB with the weight tiles; the blocks for more rows use 128 columns)
FP8_KERNEL_MAX_ROWS = 128


@dataclasses.dataclass(frozen=True)
class Fp8MatmulBlocks:
    block_n: int = 64       # output channels a program
    block_k: int = 256      # weight columns a pipeline stage
    split_k: int = 1        # programs sharing one strip of channels along K
    num_warps: int = 4
    num_stages: int = 4
    swap: bool = False      # the product as w_tile @ x_tile.T ([block_n, rows]: channels on the MMA's M side)


# Programs wanted in flight: two per SM of an H100 / H200 (132 SMs)
_TARGET_PROGRAMS = 264


def fp8_matmul_blocks(m: int, n: int, k: int) -> Fp8MatmulBlocks:
    """Blocks for an ``[m, k] x [n, k]`` product: ``block_n`` channels a program (64, fewer when ``n`` is
    small), K split until the grid has ``_TARGET_PROGRAMS`` programs or a program's share would drop under
    1,024 columns."""
    bn = 64
    while bn > 16 and n % bn:
        bn //= 2
    bk = 256 if m <= 32 else 128
    while bk > 16 and k % bk:
        bk //= 2
    split = 1
    while (n // bn) * split < _TARGET_PROGRAMS and k % (2 * split * bk) == 0 and k // (2 * split) >= 1024:
        split *= 2
    return Fp8MatmulBlocks(block_n=bn, block_k=bk, split_k=split)


def fp8_weight_matmul_reference(x: jax.Array, w: jax.Array, scale: jax.Array, out_dtype=None,
                                x_scale: jax.Array | None = None) -> jax.Array:
    """``(x @ w.T in float32) * scale`` (times ``x_scale [M]``, the rows' scales of fp8 activations) rounded to
    ``out_dtype`` (x's by default); w made x's dtype first (exact for e4m3 in bf16)."""
    if x.dtype == jnp.float8_e4m3fn:
        y = lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        y = y * x_scale.reshape(-1, 1).astype(jnp.float32)
    else:
        y = lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * scale.astype(jnp.float32)).astype(out_dtype or x.dtype)


def _kernel(x_ref, w_ref, s_ref, *refs, block_k: int, steps: int, split: bool, swap: bool, precision):
    # refs: (xs_ref, o_ref) with the rows' scales (w8a8), (o_ref,) without (w8a16: no operand of ones, which XLA
    # would fill with a memset, a thunk its CUDA graphs cannot hold)
    xs_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    rows, bn = x_ref.shape[0], w_ref.shape[0]
    nt = (((1,), (1,)), ((), ()))

    def body(i, acc):
        cols = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        x = x_ref[:, cols]
        w = w_ref[:, cols]
        if x.dtype != w.dtype:            # w8a16: the weights made the activations' type in registers
            w = w.astype(x.dtype)
        if swap:
            return acc + lax.dot_general(w, x, nt, precision=precision, preferred_element_type=jnp.float32)
        return acc + lax.dot_general(x, w, nt, precision=precision, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bn, rows) if swap else (rows, bn), jnp.float32))
    if swap:
        acc = acc.T
    if split:
        o_ref[...] = acc
    else:
        acc = acc * s_ref[...][None, :]
        o_ref[...] = (acc if xs_ref is None else acc * xs_ref[...][:, None]).astype(o_ref.dtype)


# jitted so that its lowering is cached (each layer calls it with the same shapes; a pallas_call outside a jit is
# lowered to Triton at every call)
@functools.partial(jax.jit, static_argnames=("blocks", "interpret", "out_dtype"))
def fp8_weight_matmul_kernel(x: jax.Array, w: jax.Array, scale: jax.Array, *,
                             blocks: Fp8MatmulBlocks | None = None, interpret: bool = False,
                             out_dtype=None, x_scale: jax.Array | None = None) -> jax.Array:
    """The kernel (``fp8_weight_matmul`` checks its arguments). ``x`` float8_e4m3fn with ``x_scale [M]`` (its
    rows' scales): fp8 x fp8 products (w8a8); otherwise w8a16."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    m, k = x.shape
    if m > FP8_KERNEL_MAX_ROWS:
        raise ValueError(f"{m} rows: the kernel takes at most {FP8_KERNEL_MAX_ROWS}")
    n, k2 = w.shape
    if k2 != k or scale.shape != (n,):
        raise ValueError(f"x [M, K] {x.shape}, w [N, K] {w.shape}, scale [N] {scale.shape}: shapes do not match")
    blocks = blocks or fp8_matmul_blocks(m, n, k)
    bn, bk, split = blocks.block_n, blocks.block_k, blocks.split_k
    if n % bn or k % (bk * split):
        raise ValueError(f"blocks {blocks} do not divide N={n}, K={k}")
    rows = max(_MIN_ROWS, pl.next_power_of_2(m))
    xp = jnp.pad(x, ((0, rows - m), (0, 0))) if rows != m else x
    xs = None if x_scale is None else x_scale.reshape(m).astype(jnp.float32)
    xs = jnp.pad(xs, (0, rows - m)) if xs is not None and rows != m else xs
    share = k // split
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, block_k=bk, steps=share // bk, split=split > 1, swap=blocks.swap,
                               precision=precision)
    if split > 1:
        out_spec = pl.BlockSpec((None, rows, bn), lambda j, s: (s, 0, j))
        out_shape = jax.ShapeDtypeStruct((split, rows, n), jnp.float32)
    else:
        out_spec = pl.BlockSpec((rows, bn), lambda j, s: (0, j))
        out_shape = jax.ShapeDtypeStruct((rows, n), out_dtype)
    out = pl.pallas_call(
        kernel,
        grid=(n // bn, split),
        in_specs=[pl.BlockSpec((rows, share), lambda j, s: (0, s)),
                  pl.BlockSpec((bn, share), lambda j, s: (j, s)),
                  pl.BlockSpec((bn,), lambda j, s: (j,))] + ([] if xs is None else [
                  pl.BlockSpec((rows,), lambda j, s: (0,))]),
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        name="fp8_weight_matmul",
    )(xp, w, scale.astype(jnp.float32), *([] if xs is None else [xs]))
    if split > 1:
        out = out.sum(axis=0) * scale.astype(jnp.float32)
        out = (out if xs is None else out * xs[:, None]).astype(out_dtype)
    return out[:m] if rows != m else out


def fp8_weight_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, *, impl: str = "auto",
                      blocks: Fp8MatmulBlocks | None = None, out_dtype=None,
                      x_scale: jax.Array | None = None) -> jax.Array:
    """``x [M, K] @ w [N, K].T * scale [N]`` in ``out_dtype`` (x's by default), ``w`` float8_e4m3fn; ``x``
    float8_e4m3fn too with ``x_scale [M]`` and ``out_dtype`` (w8a8). ``impl``: ``auto`` (the kernel on GPU, else
    the reference), ``kernel``, ``interpret`` or ``reference``. The kernel needs N and K divisible by 16; other
    shapes take the reference."""
    if impl == "auto":
        impl = "kernel" if on_gpu() else "reference"
    if impl not in ("kernel", "interpret", "reference"):
        raise ValueError(f"impl must be auto, kernel, interpret or reference, not {impl!r}")
    if x.dtype == jnp.float8_e4m3fn and (x_scale is None or out_dtype is None):
        raise ValueError("fp8 activations need x_scale and out_dtype")
    n, k = w.shape
    if impl == "reference" or n % 16 or k % 16:
        return fp8_weight_matmul_reference(x, w, scale, out_dtype, x_scale)
    return fp8_weight_matmul_kernel(x, w, scale, blocks=blocks, interpret=impl == "interpret", out_dtype=out_dtype,
                                    x_scale=x_scale)
