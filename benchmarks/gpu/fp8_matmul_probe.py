"""Few-row fp8 products: the Pallas fp8-weight kernel (w8a16) against cuBLASLt's w8a8 and the weights' read.

A decode step of few sequences reads every weight once; its products are bound by that read. For each distinct
projection shape of a preset (q/k/v merged, o, gate = up, down; fp8 e4m3 weights ``[out, in]`` with a scale per
output channel, ``--copies`` distinct weights a shape so that no call is served from L2) and each row count:

- ``w8a8``: ``jaxdyn.models.llama.fp8_product``, the model's product above ``fp8_kernel_max_tokens`` (each row
  quantized to fp8 on the device, cuBLASLt's fp8 x fp8 product);
- ``w8a16 xla``: the weights made bf16 by XLA, then a bf16 product (the kernel's reference);
- ``kernel``: ``pallas_kernels.fp8_matmul`` with the blocks ``fp8_matmul_blocks`` picks;
- with ``--sweep``: the kernel over a grid of blocks (channels a program, columns a stage, K split, warps,
  stages); the best is printed beside the pick.

Each time is set beside the floor: the fp8 weights' bytes at the copy bandwidth measured in this process.

    python -m benchmarks.gpu.fp8_matmul_probe [--model llama-3.1-8b] [--rows 16,64] [--sweep] [--sweep-rows 16]

Then the layer stack as a step runs it (32 layers' projections with ``silu(gate) * up`` and the residual adds,
compiled as the engine compiles its steps): bf16, w8a8 and the kernel, at each row count.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time


def _time(fn, *args, reps: int) -> float:
    for _ in range(3):
        jax_block(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax_block(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jax_block(out):
    import jax
    jax.block_until_ready(out)


def sweep_blocks(m: int, n: int, k: int):
    """Candidate ``Fp8MatmulBlocks`` for an ``[m, k] x [n, k]`` product: 64 or 128 channels a program, 128 or 256
    columns a stage, K split 1-8, 128-768 programs and two stages a program, each orientation (``swap``), 4 warps
    and 4 stages; the caller tries warps and stages on the best of these."""
    from pallas_kernels.fp8_matmul import Fp8MatmulBlocks
    out = []
    for bn, bk, split, swap in itertools.product((64, 128), (128, 256), (1, 2, 4, 8), (False, True)):
        if n % bn or k % (bk * split):
            continue
        programs, steps = (n // bn) * split, k // split // bk
        if not 128 <= programs <= 768 or steps < 2:
            continue
        out.append(Fp8MatmulBlocks(bn, bk, split, swap=swap))
    return out


def parse_quantize_config(text: str) -> tuple:
    """``ROWS/WARPS[/1p|2l[/COLS[/STAGES]]]`` (rows a program, warps, one pass or two loops, columns a block or
    ``auto``, Triton's stages) -> the tuple ``quantize_table`` times."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 5 or (len(parts) > 2 and parts[2] not in ("1p", "2l")):
        raise SystemExit(f"--quantize-configs: {text!r} is not ROWS/WARPS[/1p|2l[/COLS|auto[/STAGES]]]")
    cols = parts[3] if len(parts) > 3 else "auto"
    return (int(parts[0]), int(parts[1]), len(parts) < 3 or parts[2] == "1p", None if cols == "auto" else int(cols),
            int(parts[4]) if len(parts) > 4 else 1)


def quantize_table(args, bandwidth: float, d: int, f: int, opts: dict) -> None:
    """The row-parallel products' inputs quantized per row: XLA (``quantize_fp8`` of ``silu(gate) * up``, and of
    the attention's output) against ``pallas_kernels.fp8_quantize`` at several rows a program; floor: bytes read
    once and written once at the copy rate. 32 distinct inputs a call (a step's layers)."""
    import jax
    import jax.numpy as jnp

    from jaxdyn.models.llama import quantize_fp8
    from pallas_kernels.fp8_quantize import MLP_WARPS, ROW_WARPS, quantize_rows_fp8_kernel

    def xla(u, g, scales=None):
        if scales is not None:      # the products' epilogues first, as fp8_scaled_dot makes them
            rs, us, gs = scales
            u, g = ((a.astype(jnp.float32) * (rs * c)).astype(a.dtype) for a, c in ((u, us), (g, gs)))
        return quantize_fp8(u if g is None else jax.nn.silu(g) * u)

    # (rows a program, warps, one pass, columns a block): one pass (each value read once, the row in registers)
    # and the two-loop form (first version: 2 rows, 4 warps)
    configs = [(br, nw, True, None, 1) for br in (1, 2) for nw in (4, 8)]
    configs += [(1, 16, True, None, 1), (2, 4, False, None, 1)]
    if args.quantize_configs:
        configs = [parse_quantize_config(c) for c in args.quantize_configs.split(",")]
    for defaults in ((1, ROW_WARPS, True, None, 1), (1, MLP_WARPS, True, None, 1)):     # the entry point's,
        if defaults not in configs:                                          # always (after the ones asked for)
            configs.append(defaults)
    inputs = args.quantize_inputs.split(",")

    def name(c):
        return f"{c[0]}/{c[1]}/{'1p' if c[2] else '2l'}/{c[3] or 'auto'}/{c[4]}"

    print("\n| input | rows | floor ms | XLA ms | best kernel ms (rows a program / warps / one pass or two loops / "
          "columns a block) | two loops 2/4 ms | best kernel / XLA | best kernel / floor | every configuration ms |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---|")
    for key, label, width, silu, raw in (("silu", "silu(gate) * up", f, True, False),
                                         ("raw", "raw products -> silu(gate) * up", f, True, True),
                                         ("attn", "attention output", d, False, False)):
        if key not in inputs:
            continue
        for t in (int(r) for r in args.quantize_rows.split(",")):
            ks = jax.random.split(jax.random.key(t), 64)
            us = [jax.random.normal(ks[i], (t, width), jnp.bfloat16) for i in range(32)]
            gs = [jax.random.normal(ks[32 + i], (t, width), jnp.bfloat16) for i in range(32)] if silu else [None] * 32
            sc = [(jax.random.uniform(ks[i], (t, 1)), jnp.full((width,), 0.01), jnp.full((width,), 0.02))
                  for i in range(32)] if raw else [None] * 32
            floor = 32 * t * width * ((4 if silu else 2) + 1) / bandwidth

            def timed(fn):
                run = jax.jit(lambda us, gs, sc: [fn(u, g, s) for u, g, s in zip(us, gs, sc)]).lower(
                    us, gs, sc).compile(compiler_options=opts)
                return _time(run, us, gs, sc, reps=args.reps)

            tx = timed(xla)
            tks = {}
            for c in configs:
                br, nw, one, bc, ns = c
                try:
                    tks[c] = timed(lambda u, g, s, br=br, nw=nw, one=one, bc=bc, ns=ns: quantize_rows_fp8_kernel(
                        u, g, block_rows=br, num_warps=nw, one_pass=one, block_cols=bc, num_stages=ns, scales=s,
                        interpret=args.impl == "interpret"))
                except Exception as e:
                    print(f"  {label} t={t} {name(c)}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    tks[c] = float("inf")
            best = min(tks, key=tks.get)
            default = (1, MLP_WARPS if silu else ROW_WARPS, True, None, 1)     # quantize_rows_fp8's
            two = tks.get((2, 4, False, None, 1))
            print(f"| {label} [{t}, {width}] | {t} | {floor * 1e3:.3f} | {tx * 1e3:.3f} | {tks[best] * 1e3:.3f} "
                  f"({name(best)}; default {name(default)} {tks[default] * 1e3:.3f}) | "
                  f"{'-' if two is None else f'{two * 1e3:.3f}'} | {tks[best] / tx:.3f} | {tks[best] / floor:.2f} | "
                  + ", ".join(f"{name(c)} {v * 1e3:.3f}" for c, v in tks.items()) + " |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.fp8_matmul_probe")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rows", default="16,64")
    ap.add_argument("--sweep", action="store_true", help="time the kernel over a grid of block sizes")
    ap.add_argument("--sweep-rows", default="16", help="row counts the sweep covers (of --rows)")
    ap.add_argument("--copies", type=int, default=8, help="distinct weights a shape (past L2)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-stack", action="store_true", help="skip the layer-stack table")
    ap.add_argument("--quantize-only", action="store_true",
                    help="only the table of the row-parallel inputs' quantization (XLA against the kernel)")
    ap.add_argument("--quantize-rows", default="16,768,2048", help="row counts of the quantization table")
    ap.add_argument("--quantize-inputs", default="silu,raw,attn",
                    help="the quantization table's inputs, comma-separated: silu (silu(gate) * up), raw (from the "
                    "raw products, as the engine's MLP gives them), attn (the attention's output)")
    ap.add_argument("--quantize-configs", default=None, metavar="ROWS/WARPS[/1p|2l[/COLS[/STAGES]]],...",
                    help="only these kernel configurations (rows a program / warps / one pass or two loops / "
                    "columns a block or auto / Triton's stages; by default one pass, auto, 1 stage) beside the "
                    "entry point's defaults (1/8, and 1/16 for the MLP's input), instead of the sweep's six")
    ap.add_argument("--impl", default="kernel", choices=("kernel", "interpret"),
                    help="interpret: the kernel through Pallas interpret mode (a CPU check of this script)")
    args = ap.parse_args(argv)
    rows = tuple(int(r) for r in args.rows.split(","))
    sweep_rows = tuple(int(r) for r in args.sweep_rows.split(",")) if args.sweep else ()

    import dataclasses

    import jax
    import jax.numpy as jnp

    from benchmarks.gpu.gemm_probe import layer_dims
    from benchmarks.kernels import measure_bandwidth
    from jaxdyn.engine.runner import NO_DOT_MERGER, NO_TRITON_GEMM
    from jaxdyn.models.llama import fp8_product, quantize_fp8
    from pallas_kernels.fp8_matmul import fp8_matmul_blocks, fp8_weight_matmul, fp8_weight_matmul_reference

    mc, d, f, nq, nkv, _ = layer_dims(args.model)
    counter = itertools.count()
    keys = iter(lambda: jax.random.fold_in(jax.random.key(1), next(counter)), None)
    f8 = jnp.float8_e4m3fn
    shapes = dict(qkv=(nq + 2 * nkv, d), o=(d, nq), gate=(f, d), down=(d, f))   # [N, K]
    opts = dict(NO_DOT_MERGER, **NO_TRITON_GEMM)      # as the engine compiles an fp8 model's steps

    def fp8_weight(shape, key):
        w = jax.random.normal(key, shape, jnp.float32)
        scale = jnp.max(jnp.abs(w), axis=1) / 448.0
        return (w / scale[:, None]).astype(f8), scale * shape[1] ** -0.5

    bandwidth = measure_bandwidth(4.0)
    print(f"{args.model}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (this process); {args.copies} distinct "
          f"weights a shape", flush=True)

    quantize_table(args, bandwidth, d, f, opts)
    if args.quantize_only:
        return 0

    def compiled(fn, x, ws):
        return jax.jit(fn).lower(x, ws).compile(compiler_options=opts)

    def over(product):
        return lambda x, ws: [product(x, w, s) for w, s in ws]

    def mode_product(mode, blocks=None):
        """The kernel's product in ``mode``: ``w8a16`` (bf16 rows, weights made bf16 in registers) or ``w8a8``
        (rows quantized per row by XLA as the model does, fp8 x fp8 tiles in the kernel)."""
        if mode == "w8a16":
            return lambda x, w, s: fp8_weight_matmul(x, w, s, impl=args.impl, blocks=blocks)

        def w8a8(x, w, s):
            xq, sx = quantize_fp8(x)
            return fp8_weight_matmul(xq, w, s, impl=args.impl, blocks=blocks, x_scale=sx, out_dtype=x.dtype)
        return w8a8

    modes = ("w8a16", "w8a8")
    fmt = lambda b: f"{b.block_n}/{b.block_k}/{b.split_k}/w{b.num_warps}/s{b.num_stages}" + ("/swap" if b.swap else "")
    best_blocks = {}
    print("\n| shape [N, K] | rows | floor ms | cuBLASLt w8a8 ms | w8a16 xla ms | "
          + " | ".join(f"kernel {mode} ms (blocks)" for mode in modes) + " | best kernel / floor | best kernel / cuBLASLt |")
    print("|---|---:|---:|---:|---:|" + "---|" * len(modes) + "---:|---:|")
    for name, (n, k) in shapes.items():
        ws = [fp8_weight((n, k), next(keys)) for _ in range(args.copies)]
        floor = args.copies * n * k / bandwidth
        for m in rows:
            x = (jax.random.normal(jax.random.key(m), (m, k), jnp.float32) * 0.5).astype(jnp.bfloat16)
            t8 = _time(compiled(over(fp8_product), x, ws), x, ws, reps=args.reps)
            t16 = _time(compiled(over(fp8_weight_matmul_reference), x, ws), x, ws, reps=args.reps)
            cells, bests = [], []
            for mode in modes:
                def kernel_time(blocks):
                    try:
                        return _time(compiled(over(mode_product(mode, blocks)), x, ws), x, ws, reps=args.reps)
                    except Exception as e:      # a tiling that does not fit (shared memory, registers)
                        print(f"  {name} m={m} {mode} {fmt(blocks)}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                        return float("inf")

                pick = fp8_matmul_blocks(m, n, k)
                tried = {pick: kernel_time(pick)}
                if m in sweep_rows:
                    for b in sweep_blocks(m, n, k):
                        if b not in tried:
                            tried[b] = kernel_time(b)
                    top = sorted(tried, key=tried.get)[:2]
                    for b, (warps, stages) in itertools.product(top, ((4, 3), (4, 6), (8, 3), (8, 5))):
                        v = dataclasses.replace(b, num_warps=warps, num_stages=stages)
                        if v not in tried:
                            tried[v] = kernel_time(v)
                b = min(tried, key=tried.get)
                best_blocks[(name, m, mode)] = b
                bests.append(tried[b])
                cells.append(f"{tried[b] * 1e3:.3f} ({fmt(b)})")
            print(f"| {name} [{n}, {k}] | {m} | {floor * 1e3:.3f} | {t8 * 1e3:.3f} | {t16 * 1e3:.3f} | "
                  + " | ".join(cells) + f" | {min(bests) / floor:.2f} | {min(bests) / t8:.3f} |", flush=True)
        del ws
    if sweep_rows:
        print("\nbest swept blocks: " + "; ".join(f"{k[0]} m={k[1]} {k[2]}: {v}" for k, v in best_blocks.items()
                                                if k[1] in sweep_rows))

    if not args.no_stack:
        layers = []
        for _ in range(mc.num_layers):
            layers.append({name: fp8_weight(shape, next(keys)) for name, shape in dict(shapes, up=(f, d)).items()})
        weight_bytes = mc.num_layers * (sum(n * k for n, k in shapes.values()) + f * d)

        def stack(product):
            def fwd(x, layers):
                for p in layers:
                    qkv = product(x, *p["qkv"])
                    q, kk, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
                    x = x + product(q + jnp.tile(kk + v, (1, nq // nkv)), *p["o"])
                    x = x + product(jax.nn.silu(product(x, *p["gate"])) * product(x, *p["up"]), *p["down"])
                return x
            return fwd

        print(f"\nlayer stack: {mc.num_layers} layers, {weight_bytes / 1e9:.2f} GB of fp8 weights read a forward; floor = that at the copy rate: {weight_bytes / bandwidth * 1e3:.2f} ms")
        print("| rows | cuBLASLt w8a8 ms | " + " | ".join(f"kernel {mode} ms" for mode in modes)
              + " | best kernel / cuBLASLt | best kernel / floor |")
        print("|---:|---:|" + "---:|" * len(modes) + "---:|---:|")
        shape_of = {v: name for name, v in shapes.items()}
        for m in rows:
            x = (jax.random.normal(jax.random.key(m), (m, d), jnp.float32) * 0.5).astype(jnp.bfloat16)
            t8 = _time(compiled(stack(fp8_product), x, layers), x, layers, reps=args.reps)
            times = []
            for mode in modes:
                def product(x, w, s, mode=mode):
                    b = best_blocks.get((shape_of[tuple(w.shape)], m, mode))
                    return mode_product(mode, b)(x, w, s)
                times.append(_time(compiled(stack(product), x, layers), x, layers, reps=args.reps))
            floor = weight_bytes / bandwidth
            print(f"| {m} | {t8 * 1e3:.2f} | " + " | ".join(f"{t * 1e3:.2f}" for t in times)
                  + f" | {min(times) / t8:.3f} | {min(times) / floor:.2f} |", flush=True)
    print(f"reproduce: python -m benchmarks.gpu.fp8_matmul_probe --model {args.model} --rows {args.rows}"
          + (f" --sweep --sweep-rows {args.sweep_rows}" if args.sweep else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
