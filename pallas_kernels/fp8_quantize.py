"""Rows quantized to fp8 with one scale a row, in one kernel (Pallas, GPU); optionally ``silu(gate) * up`` first.

An fp8 (w8a8) model quantizes each product's input per token: ``scale = max|row| / 448``, ``q = row / scale``.
For the inputs of the row-parallel products (the attention's output before ``o_proj``, the MLP's
``silu(gate) * up`` before ``down_proj``) XLA made two kernels of that: a reduction that reads the rows for
their maxima and a second kernel that reads them again to divide and convert. On an H200, in a 2,048-token step
of the 8B shape, the two took 5.2 ms of the step's 32.6 (``benchmarks/gpu/profile_run.py --quant fp8``): the
MLP's rows are ``2 x 14,336`` bf16 values a token, each read twice, and ``silu(gate) * up`` made twice.

Here one program owns ``block_rows`` rows. In one pass (``one_pass``, the default up to ``ONE_PASS_MAX_STEPS``
column blocks a row) the program loads all its columns at once -- the blocks are unrolled, so every load is in
flight together and the row sits in registers -- finds the maxima and writes fp8 and the scales: each value is
read from HBM once. Otherwise (wider rows) a first loop over the columns finds the maxima and a second loop
re-reads them (from L2: a program's rows were just read); that loop form was this kernel's first version, and
with one load in flight per program it ran at 2.7-4.5x the bytes' floor on an H200, no faster than XLA's two
kernels (``benchmarks/gpu/fp8_matmul_probe.py --quantize-only``). With ``gate``
the value quantized is ``silu(gate) * up`` rounded to ``up``'s dtype, computed in the kernel, so the MLP's
product ``h`` is never written in bf16.

``quantize_rows_fp8`` is the entry point: the kernel on GPU, Pallas interpret mode (CPU tests) or the
``jax.numpy`` reference, which computes the same values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_decode import on_gpu

FP8_MAX = 448.0                 # the largest finite float8_e4m3fn
ONE_PASS_MAX_STEPS = 16         # column blocks a row loaded at once (16 x 2,048: rows up to 32,768 wide)
# Warps a program (one row) by default: 16 for the MLP's input (``gate`` given: two rows of the intermediate width,
# 2 x 14,336 values in the 8B shape), 8 otherwise. On an H200, from the raw products at 2,048 / 768 rows, 16 warps
# took 0.85x / 0.93x the time of 8 (``benchmarks/gpu/fp8_matmul_probe.py --quantize-only``, twentieth session;
# 0.87x / 0.93x in the fourteenth), and the engine's 512-2,048-token steps (which take the kernel) cost 0.6-4.6 %
# less in 7 of 8 warm-up measurements; the attention's output (4,096 wide) was fastest at 8.
MLP_WARPS, ROW_WARPS = 16, 8


def _scaled(raw, row_scale, col_scale):
    """An fp8 product's epilogue as ``jaxdyn.models.llama.fp8_scaled_dot`` makes it: the raw product times its
    rows' and its channels' scales, rounded to the raw product's dtype."""
    return (raw.astype(jnp.float32) * (row_scale[:, None] * col_scale[None, :])).astype(raw.dtype)


def _values(up, gate):
    """The f32 values quantized: ``up``, or ``silu(gate) * up`` rounded to up's dtype."""
    if gate is None:
        return up.astype(jnp.float32)
    g = gate.astype(jnp.float32)
    h = (g / (1.0 + jnp.exp(-g))) * up.astype(jnp.float32)
    return h.astype(up.dtype).astype(jnp.float32)


def quantize_rows_fp8_reference(x: jax.Array, gate: jax.Array | None = None,
                                scales: tuple | None = None) -> tuple[jax.Array, jax.Array]:
    """(values in float8_e4m3fn [..., F], f32 scales [..., 1]): a scale a row, its absolute maximum / 448.
    ``scales``: see ``quantize_rows_fp8``."""
    if scales is not None:
        rs, us, gs = _check_scales(x, gate, scales)
        x = _scaled(x, rs, us)
        gate = None if gate is None else _scaled(gate, rs, gs)
    v = _values(x, gate)
    scale = jnp.maximum(jnp.max(jnp.abs(v), axis=-1, keepdims=True), 1e-12) / FP8_MAX
    return jnp.clip(v / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn), scale


def _check_scales(x, gate, scales):
    """(row scales [T], up's channel scales [F], gate's [F] or None) of a ``scales`` tuple, checked."""
    if len(scales) != 3:
        raise ValueError("scales must be (row_scale, up_scale, gate_scale)")
    rs, us, gs = scales
    t, f = x.shape
    rs = jnp.reshape(rs, (-1,))
    if rs.shape != (t,) or jnp.shape(us) != (f,) or (gate is not None and jnp.shape(gs) != (f,)):
        raise ValueError(f"scales must be [T] or [T, 1] rows and [F] channels for [T, F] = {x.shape}, got "
                         f"{[None if a is None else jnp.shape(a) for a in scales]}")
    return rs.astype(jnp.float32), us.astype(jnp.float32), None if gate is None else gs.astype(jnp.float32)


def _kernel(*refs, block_cols: int, steps: int, silu: bool, one_pass: bool, scaled: bool):
    refs = list(refs)
    g_ref = refs.pop(0) if silu else None
    u_ref = refs.pop(0)
    rs_ref = us_ref = gs_ref = None
    if scaled:
        rs_ref, us_ref = refs.pop(0), refs.pop(0)
        gs_ref = refs.pop(0) if silu else None
    q_ref, s_ref = refs

    def values(j):
        start = j * block_cols if isinstance(j, int) else pl.multiple_of(j * block_cols, block_cols)
        cols = pl.ds(start, block_cols)
        u = u_ref[:, cols]
        g = None if g_ref is None else g_ref[:, cols]
        if scaled:
            rs = rs_ref[...]
            u = _scaled(u, rs, us_ref[cols])
            g = None if g is None else _scaled(g, rs, gs_ref[cols])
        return cols, _values(u, g)

    def row_max(j, m):
        _, v = values(j)
        return jnp.maximum(m, jnp.max(jnp.abs(v), axis=1))

    if one_pass:
        blocks = [values(j) for j in range(steps)]
        m = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(v), axis=1) for _, v in blocks])
        scale = jnp.maximum(m, 1e-12) / FP8_MAX
        for cols, v in blocks:
            q_ref[:, cols] = jnp.clip(v / scale[:, None], -FP8_MAX, FP8_MAX).astype(q_ref.dtype)
        s_ref[...] = scale
        return

    m = lax.fori_loop(0, steps, row_max, jnp.zeros((u_ref.shape[0],), jnp.float32))
    scale = jnp.maximum(m, 1e-12) / FP8_MAX

    def store(j, carry):
        cols, v = values(j)
        q_ref[:, cols] = jnp.clip(v / scale[:, None], -FP8_MAX, FP8_MAX).astype(q_ref.dtype)
        return carry

    lax.fori_loop(0, steps, store, 0)
    s_ref[...] = scale


# jitted so that its lowering is cached: each layer calls it with the same shapes, and a pallas_call outside a jit is
# lowered to Triton at every call (in an 8B step of 2,048 tokens, 64 calls: 3.6 s of a warm-up's serial lowering on a
# 2-core CPU, against one lowering a kernel jitted)
@functools.partial(jax.jit, static_argnames=("block_rows", "block_cols", "num_warps", "num_stages", "one_pass",
                                             "interpret"))
def quantize_rows_fp8_kernel(x: jax.Array, gate: jax.Array | None = None, *, block_rows: int = 1,
                             block_cols: int | None = None, num_warps: int | None = None, num_stages: int = 1,
                             one_pass: bool | None = None, scales: tuple | None = None,
                             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The kernel: ``block_rows`` rows a program, their columns in blocks of ``block_cols`` (by default the
    largest power of two up to 2,048 that divides the width), all loaded at once when ``one_pass`` (by default
    when the blocks are at most ``ONE_PASS_MAX_STEPS``), else in two loops; ``num_warps`` a program (by default
    ``MLP_WARPS`` with ``gate``, else ``ROW_WARPS``)."""
    if num_warps is None:
        num_warps = MLP_WARPS if gate is not None else ROW_WARPS
    t, f = x.shape
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate {gate.shape} and up {x.shape} differ")
    bc = block_cols or 2048
    while block_cols is None and bc > 16 and f % bc:
        bc //= 2
    if f % bc:
        raise ValueError(f"block_cols={bc} does not divide the row width {f}")
    rows = pl.cdiv(t, block_rows) * block_rows

    def padded(a):          # rows up to a whole number of programs' (a copy: only where block_rows > 1)
        return a if rows == t else jnp.pad(a, ((0, rows - t),) + ((0, 0),) * (a.ndim - 1))

    ops = [padded(a) for a in ([x] if gate is None else [gate, x])]
    spec = pl.BlockSpec((block_rows, f), lambda i: (i, 0))
    specs = [spec] * len(ops)
    if scales is not None:
        rs, us, gs = _check_scales(x, gate, scales)
        channels = [us] + ([] if gate is None else [gs])
        ops += [padded(rs)] + channels
        specs += [pl.BlockSpec((block_rows,), lambda i: (i,))] + [pl.BlockSpec((f,), lambda i: (0,))] * len(channels)
    q, s = pl.pallas_call(
        functools.partial(_kernel, block_cols=bc, steps=f // bc, silu=gate is not None,
                          one_pass=f // bc <= ONE_PASS_MAX_STEPS if one_pass is None else one_pass,
                          scaled=scales is not None),
        grid=(rows // block_rows,),
        in_specs=specs,
        out_specs=[spec, pl.BlockSpec((block_rows,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((rows, f), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((rows,), jnp.float32)],
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="quantize_rows_fp8",
    )(*ops)
    return q[:t], s[:t, None]


def quantize_rows_fp8(x: jax.Array, gate: jax.Array | None = None, *, scales: tuple | None = None,
                      impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """``x [T, F]`` (or ``silu(gate) * x``) quantized per row: (float8_e4m3fn [T, F], f32 scales [T, 1]).
    ``scales = (row_scale [T, 1], up_scale [F], gate_scale [F])``: ``x`` and ``gate`` are fp8 products' raw
    results (``fp8_dot``), each first scaled as ``fp8_scaled_dot`` scales it -- by the rows' scale and its own
    channels' -- and rounded to its dtype, in the kernel: the scaled products are never written.
    ``impl``: ``auto`` (the kernel on GPU, else the reference), ``kernel``, ``interpret`` or ``reference``. The
    kernel needs F divisible by 16; other widths take the reference."""
    if impl == "auto":
        impl = "kernel" if on_gpu() else "reference"
    if impl not in ("kernel", "interpret", "reference"):
        raise ValueError(f"impl must be auto, kernel, interpret or reference, not {impl!r}")
    if x.ndim != 2:
        raise ValueError(f"x must be [T, F], got {x.shape}")
    if impl == "reference" or x.shape[1] % 16:
        return quantize_rows_fp8_reference(x, gate, scales)
    return quantize_rows_fp8_kernel(x, gate, scales=scales, interpret=impl == "interpret")
