"""The residual add, RMSNorm and the per-row fp8 quantization of an fp8 (w8a8) model's layer inputs, in one kernel.

Each decoder layer of an fp8 model makes, twice, ``h = x + delta`` (``delta`` the previous product's output: the
attention's ``o_proj``, or the MLP's ``down_proj``), ``y = rms_norm(h) * w`` rounded to bf16, and ``y`` quantized
per row (``scale = max|y| / 448``) for the next products (q/k/v, or gate/up). XLA made three kernels of that (the
add; the scale, a reduction nested in a reduction; the quantized values, which recompute the norm), and the add of
``delta`` once more where the residual itself was needed: at a 16-token step of the 8B shape ~5 launches a layer of
2-3 µs each, at 2,048 tokens ~63 µs a layer against ~17 µs for the bytes (``benchmarks/gpu/profile_run.py``
traces of the 16- and 2,048-token buckets, twentieth and twenty-eighth sessions). vLLM fuses the same
(``rms_norm_dynamic_per_token_quant``).

Here one program owns ``block_rows`` rows and writes, in one pass: ``h`` (bf16), the fp8 values of ``y`` and the
rows' scales. ``delta`` comes as an fp8 product's raw result with its rows' and channels' scales (``(raw,
row_scale, col_scale)``, scaled as ``jaxdyn.models.llama.fp8_scaled_dot`` scales it, in the kernel), so the
scaled product is never written. The values are those of the ``jax.numpy`` form (``add_rms_norm_fp8_reference``:
the model's own ``RMSNorm`` and ``quantize_fp8``, run op by op) but for the order of the kernel's float32 sums.
Compiled by XLA for a GPU, the unfused form quantizes the norm's output before its rounding to bf16 (XLA's
``xla_allow_excess_precision``, on by default, drops the round trip): there about 2 % of the fp8 codes differ by
one step from the kernel's, which rounds as Hugging Face's RMSNorm does.

``add_rms_norm_fp8`` is the entry point: the kernel on GPU, Pallas interpret mode (CPU tests) or the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fp8_quantize import FP8_MAX, _scaled, quantize_rows_fp8_reference
from pallas_kernels.paged_decode import on_gpu

MAX_BLOCK_COLS = 4096   # a row's columns loaded as blocks of at most this many (powers of two: Triton's tiles)
# warps a program (one row): on an H100 at the 8B width (32 sites chained), 8 warps took 0.92-0.97x the time of 4
# at 16-1,024 rows; at 2,048 rows 1.04x in one process and 0.98x in another, where 4 rows a program with 16 warps
# took 0.97x of 8 but lost in the engine (15,294 against 15,420 output tok/s; ``benchmarks/gpu/norm_probe.py``
# and ``ab_offline.py``, session 35)
NUM_WARPS = 8


def rms_norm_reference(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as the model computes it: in float32, the weight multiplied before the one rounding to x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def _check_delta(x, delta):
    """(raw [T, D], row scales [T] f32, channel scales [D] f32) of a ``delta`` tuple, checked against x [T, D]."""
    if not (isinstance(delta, tuple) and len(delta) == 3):
        raise ValueError("delta must be (raw, row_scale, col_scale)")
    raw, rs, cs = delta
    t, d = x.shape
    rs = jnp.reshape(rs, (-1,))
    if raw.shape != x.shape or rs.shape != (t,) or jnp.shape(cs) != (d,):
        raise ValueError(f"delta must be raw {x.shape}, row scales [T] or [T, 1] and channel scales [D] for x "
                         f"{x.shape}, got {[jnp.shape(a) for a in delta]}")
    return raw, rs.astype(jnp.float32), cs.astype(jnp.float32)


def add_rms_norm_fp8_reference(x: jax.Array, weight: jax.Array, eps: float, delta: tuple | None = None
                               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(h, q, scales): ``h = x + delta`` in x's dtype (x when ``delta`` is None), ``q`` float8_e4m3fn [T, D] and
    ``scales`` f32 [T, 1] of ``rms_norm_reference(h, weight, eps)`` quantized per row."""
    h = x
    if delta is not None:
        raw, rs, cs = _check_delta(x, delta)
        h = x + _scaled(raw, rs, cs).astype(x.dtype)
    q, s = quantize_rows_fp8_reference(rms_norm_reference(h, weight, eps))
    return h, q, s


def _kernel(*refs, eps: float, block_cols: int, steps: int, width: int, has_delta: bool):
    if has_delta:
        x_ref, raw_ref, rs_ref, cs_ref, w_ref, h_ref, q_ref, s_ref = refs
    else:
        x_ref, w_ref, q_ref, s_ref = refs
    blocks = []
    for j in range(steps):              # unrolled: every block's loads in flight at once
        cols = pl.ds(j * block_cols, block_cols)
        x = x_ref[:, cols]
        if has_delta:
            d = _scaled(raw_ref[:, cols], rs_ref[...], cs_ref[cols]).astype(x.dtype)
            x = (x.astype(jnp.float32) + d.astype(jnp.float32)).astype(x.dtype)
            h_ref[:, cols] = x
        blocks.append((cols, x.astype(jnp.float32)))
    ss = functools.reduce(jnp.add, [jnp.sum(v * v, axis=1) for _, v in blocks])
    r = lax.rsqrt(ss / width + eps)[:, None]
    ys = [(cols, (v * r * w_ref[cols].astype(jnp.float32)[None, :]).astype(x_ref.dtype).astype(jnp.float32))
          for cols, v in blocks]
    m = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(y), axis=1) for _, y in ys])
    scale = jnp.maximum(m, 1e-12) / FP8_MAX
    for cols, y in ys:
        q_ref[:, cols] = jnp.clip(y / scale[:, None], -FP8_MAX, FP8_MAX).astype(q_ref.dtype)
    s_ref[...] = scale


@functools.partial(jax.jit, static_argnames=("eps", "block_rows", "num_warps", "interpret"))
def add_rms_norm_fp8_kernel(x: jax.Array, weight: jax.Array, delta: tuple | None = None, *, eps: float,
                            block_rows: int | None = None, num_warps: int | None = None, interpret: bool = False
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel: ``block_rows`` rows a program (default 1), each row's columns in blocks of the largest power of
    two up to ``MAX_BLOCK_COLS`` that divides the width, all loaded at once; ``num_warps`` a program (default
    NUM_WARPS a row). Returns ``add_rms_norm_fp8_reference``'s triple (``h`` is x when ``delta`` is None)."""
    t, d = x.shape
    block_rows = block_rows or 1
    num_warps = num_warps or NUM_WARPS * block_rows
    bc = MAX_BLOCK_COLS
    while bc > 16 and d % bc:
        bc //= 2
    if d % bc:
        raise ValueError(f"the width {d} is not a multiple of 16")
    if weight.shape != (d,):
        raise ValueError(f"weight {weight.shape} does not match the width {d}")
    if t % block_rows:
        raise ValueError(f"block_rows={block_rows} does not divide the rows {t}")
    row = pl.BlockSpec((block_rows, d), lambda i: (i, 0))
    rows = pl.BlockSpec((block_rows,), lambda i: (i,))
    whole = pl.BlockSpec((d,), lambda i: (0,))
    ops, specs = [x], [row]
    out_shape = [jax.ShapeDtypeStruct((t, d), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((t,), jnp.float32)]
    out_specs = [row, rows]
    if delta is not None:
        raw, rs, cs = _check_delta(x, delta)
        ops += [raw, rs, cs]
        specs += [row, rows, whole]
        out_shape.insert(0, jax.ShapeDtypeStruct((t, d), x.dtype))
        out_specs.insert(0, row)
    outs = pl.pallas_call(
        functools.partial(_kernel, eps=eps, block_cols=bc, steps=d // bc, width=d, has_delta=delta is not None),
        grid=(t // block_rows,),
        in_specs=specs + [whole],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        name="add_rms_norm_fp8",
    )(*ops, weight)
    h, q, s = outs if delta is not None else (x, *outs)
    return h, q, s[:, None]


def add_rms_norm_fp8(x: jax.Array, weight: jax.Array, eps: float, delta: tuple | None = None, *,
                     impl: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x [T, D]`` plus ``delta`` (an fp8 product's ``(raw [T, D], row_scale [T, 1], col_scale [D])``, scaled and
    rounded to x's dtype; none when None), RMSNorm'd with ``weight`` and quantized per row: (h [T, D] in x's dtype,
    float8_e4m3fn [T, D], f32 scales [T, 1]). ``impl``: ``auto`` (the kernel on GPU, else the reference),
    ``kernel``, ``interpret`` or ``reference``. Widths that are not a multiple of 16 take the reference."""
    if impl == "auto":
        impl = "kernel" if on_gpu() else "reference"
    if impl not in ("kernel", "interpret", "reference"):
        raise ValueError(f"impl must be auto, kernel, interpret or reference, not {impl!r}")
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got {x.shape}")
    if impl == "reference" or x.shape[1] % 16:
        return add_rms_norm_fp8_reference(x, weight, eps, delta)
    return add_rms_norm_fp8_kernel(x, weight, delta, eps=float(eps), interpret=impl == "interpret")
