"""The residual add and the RMSNorm after it, as one kernel (Pallas, GPU).

A decoder layer adds the attention's output to the residual stream, normalises the sum for the MLP, adds the
MLP's output and normalises again for the next layer. XLA makes each add and each norm a kernel of its own on
the GPU (the norm is a Triton fusion that takes one output, so the add, which the next add also reads, stays
outside it): four kernels a layer, 129 a step of the 8B shape, and the sum written and read back between them.
This kernel reads the residual and the addend once and writes both the new residual and its normalised form::

    s = x + delta                          # rounded to x's dtype: the residual stream, as the unfused model
    h = s * rsqrt(mean(s^2) + eps) * w     # in float32, rounded once (``jaxdyn.models.llama.RMSNorm``)

Each program normalises ``block_rows`` rows of the ``[T, D]`` arrays, with enough warps that a thread holds about
32 float32 values of them (they stay live across the row's sum). ``D`` must be a power of two (Triton's block
shapes); ``add_rmsnorm`` takes the ``jax.numpy`` reference for other widths and off the GPU. The sum is the
same; the norm's mean of squares may be summed in another order than XLA's, so a normalised value can differ
from the unfused model's in its last bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_decode import on_gpu


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, the weight multiplied in float32 before the one rounding to x's dtype (the
    model's ``RMSNorm``, this kernel's body and its reference share it)."""
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def add_rmsnorm_reference(x: jax.Array, delta: jax.Array, weight: jax.Array, *, eps: float
                          ) -> tuple[jax.Array, jax.Array]:
    """(x + delta, RMSNorm(x + delta) * weight), both in x's dtype; x, delta: [T, D], weight: [D]."""
    s = x + delta.astype(x.dtype)
    return s, rms_norm(s, weight, eps)


def _kernel(x_ref, d_ref, w_ref, s_ref, h_ref, *, eps: float):
    s = x_ref[...] + d_ref[...].astype(x_ref.dtype)
    s_ref[...] = s
    h_ref[...] = rms_norm(s, w_ref[...], eps)


def block_rows(num_rows: int, cap: int = 4) -> int:
    """Rows a program takes: the largest power of two up to ``cap`` that divides ``num_rows``."""
    b = cap
    while num_rows % b:
        b //= 2
    return b


def kernel_supported(width: int) -> bool:
    return width >= 16 and width & (width - 1) == 0


def warps_for(rows: int, width: int) -> int:
    """Warps of a program of ``rows`` x ``width`` values: about 32 float32 values a thread, 1 to 16 warps."""
    return min(16, max(1, rows * width // 1024))


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "num_warps"))
def add_rmsnorm_kernel(x: jax.Array, delta: jax.Array, weight: jax.Array, *, eps: float,
                       interpret: bool = False, num_warps: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The Pallas kernel (GPU, or Pallas interpret mode); same contract as the reference. ``num_warps``:
    None for ``warps_for`` the program's block."""
    t, d = x.shape
    if not kernel_supported(d):
        raise ValueError(f"add_rmsnorm_kernel: width {d} is not a power of two of at least 16")
    if t == 0:                      # no program to launch
        return add_rmsnorm_reference(x, delta, weight, eps=eps)
    br = block_rows(t)
    num_warps = num_warps or warps_for(br, d)
    row = pl.BlockSpec((br, d), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps),
        grid=(t // br,),
        in_specs=[row, row, pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2,
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        name="add_rmsnorm",
    )(x, delta, weight)


def add_rmsnorm(x: jax.Array, delta: jax.Array, weight: jax.Array, *, eps: float, impl: str = "auto"
                ) -> tuple[jax.Array, jax.Array]:
    """Entry point. ``impl``: ``auto`` (the kernel on GPU where the width allows it, else the reference),
    ``kernel``, ``interpret`` (the kernel through Pallas interpret mode) or ``reference``."""
    if impl == "auto":
        impl = "kernel" if on_gpu() and kernel_supported(x.shape[-1]) else "reference"
    if impl == "reference":
        return add_rmsnorm_reference(x, delta, weight, eps=eps)
    if impl not in ("kernel", "interpret"):
        raise ValueError(f"impl must be auto, kernel, interpret or reference, not {impl!r}")
    return add_rmsnorm_kernel(x, delta, weight, eps=eps, interpret=impl == "interpret")
