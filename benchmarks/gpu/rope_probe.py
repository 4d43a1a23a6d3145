"""The rope kernel scaling an fp8 q/k/v product itself against XLA scaling it first, at the 8B shape, on the device.

An fp8 layer's q/k/v product comes out raw (before its rows' and channels' scales). Either XLA scales it in a kernel
of its own and ``rope_write_kv`` reads the scaled rows (the tree before session 44), or the rope kernel reads the raw
rows and the scales (``rope_write_kv(scales=)``, a block of tokens a program). Each form is timed as 32 calls in one
jitted program, each call on its own layer's pages and product (as a step's 32 layers), wall time / 32, the median
of ``--reps``; the bytes' floor (the raw rows read, q written, k and v written in fp8) at the copy rate measured in
the same process.

    python -m benchmarks.gpu.rope_probe [--tokens 16,64,512,2048] [--reps 9]
"""

from __future__ import annotations

import argparse

LAYERS, HQ, HK, D, PAGE = 32, 32, 8, 128, 16


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.rope_probe")
    p.add_argument("--tokens", default="16,64,512,2048")
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args(argv)
    try:
        sizes = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens: expected integers separated by commas, got {args.tokens!r}")

    import jax
    import jax.numpy as jnp

    from benchmarks.kernels import _median_time, measure_bandwidth
    from jaxdyn.models.llama import fp8_scale
    from pallas_kernels.rope_kv import rope_write_kv, tokens_per_program

    width = (HQ + 2 * HK) * D
    copy = measure_bandwidth()
    print(f"{jax.devices()[0].device_kind}; copy {copy / 1e12:.2f} TB/s in this process")
    print("| tokens | tokens a program | XLA scales, then the kernel µs | the kernel scales µs | x before "
          "| floor µs |\n|---:|---:|---:|---:|---:|---:|")
    for t in sizes:
        key = jax.random.key(t)
        raw = [(jax.random.normal(jax.random.fold_in(key, i), (t, width), jnp.float32) * 8).astype(jnp.bfloat16)
               for i in range(LAYERS)]
        rows = jax.random.uniform(jax.random.fold_in(key, 99), (t,), jnp.float32, 0.01, 0.1)
        cols = [jax.random.uniform(jax.random.fold_in(key, 100 + i), (width,), jnp.float32, 0.5, 1.5)
                for i in range(LAYERS)]
        pos = jnp.arange(t, dtype=jnp.float32)[:, None] * jnp.ones((D,), jnp.float32) * 1e-3
        cos, sin = jnp.cos(pos).astype(jnp.bfloat16), jnp.sin(pos).astype(jnp.bfloat16)
        num_pages = -(-t // PAGE) + 1
        pages = [(jnp.zeros((HK, num_pages, PAGE, D), jnp.float8_e4m3fn),) * 2 for _ in range(LAYERS)]
        slots = jnp.arange(t, dtype=jnp.int32)
        page, offset = slots // PAGE, slots % PAGE

        def before(raw, cols, pages):
            out = []
            for r, c, (kp, vp) in zip(raw, cols, pages):
                x = fp8_scale(r, rows[:, None], c, r.dtype)
                out.append(rope_write_kv(x, cos, sin, kp, vp, page, offset, num_q_heads=HQ, num_kv_heads=HK)[0])
            return out

        def after(raw, cols, pages):
            return [rope_write_kv(r, cos, sin, kp, vp, page, offset, num_q_heads=HQ, num_kv_heads=HK,
                                  scales=(rows, c))[0] for r, c, (kp, vp) in zip(raw, cols, pages)]

        fb, fa = jax.jit(before), jax.jit(after)
        qb, qa = fb(raw, cols, pages), fa(raw, cols, pages)
        diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(qa, qb))
        tb = _median_time(fb, raw, cols, pages, reps=args.reps) / LAYERS
        ta = _median_time(fa, raw, cols, pages, reps=args.reps) / LAYERS
        floor = t * (width * 2 + HQ * D * 2 + 2 * HK * D) / copy
        print(f"| {t} | {tokens_per_program(t, True)} | {tb * 1e6:.1f} | {ta * 1e6:.1f} | {ta / tb:.3f} | "
              f"{floor * 1e6:.1f} | (q max |diff| {diff:.3g})", flush=True)
        del raw, pages
    print(f"reproduce: python -m benchmarks.gpu.rope_probe --tokens {args.tokens} --reps {args.reps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
