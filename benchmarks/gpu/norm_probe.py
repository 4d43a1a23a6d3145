"""The layer inputs' residual add, RMSNorm and fp8 quantization: XLA's fusions against ``pallas_kernels.rms_norm_fp8``.

At each row count, a chain of 32 sites as a step of an fp8 model makes them (each site's residual the previous
site's output ``h``, so that nothing runs side by side that a step runs in turn): ``h = x + delta`` (``delta`` an fp8
product's raw result with its rows' and channels' scales), ``(q, s)`` the per-row fp8 quantization of
``rms_norm(h) * w``. ``xla``: the model's unfused operations in one jit; ``kernel``: the fused kernel in each of
``--configs`` (rows a program / warps; the fastest at each row count printed last, as ``best at T rows: R/W``). The floor: the bytes a site must move (x and the raw product read, h and q written) at the copy rate
measured in this process. Times are a call's median, dispatch included (about 0.1 ms a call).

    python -m benchmarks.gpu.norm_probe [--rows 16,64,128,512,2048] [--width 4096] [--configs 1/4,1/8] [--reps 20]
"""

from __future__ import annotations

import argparse
import sys

SITES = 32


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.norm_probe")
    ap.add_argument("--rows", default="16,64,128,512,2048")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--configs", default="1/4,1/8", metavar="R/W,...",
                    help="the kernel's configurations: rows a program / warps")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--impl", default="kernel", choices=("kernel", "interpret"),
                    help="interpret: Pallas interpret mode (a CPU check of this script, not a measurement)")
    args = ap.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
        configs = [tuple(int(v) for v in c.split("/")) for c in args.configs.split(",")]
    except ValueError:
        ap.error("--rows: comma-separated integers; --configs: R/W pairs, comma-separated")
    if any(len(c) != 2 for c in configs):
        ap.error("--configs: R/W pairs (rows a program / warps), comma-separated")
    if min(rows) < 1 or min(min(c) for c in configs) < 1 or args.reps < 1:
        ap.error("--rows, --configs and --reps must be at least 1")
    if args.width < 16 or args.width % 16:
        ap.error(f"--width: a multiple of 16 (the kernel's column blocks), got {args.width}")
    if any(br & (br - 1) for br, _ in configs):
        ap.error("--configs: rows a program must be a power of two (Triton's tiles)")

    import jax
    import jax.numpy as jnp

    from benchmarks.gpu.fp8_matmul_probe import _time
    from benchmarks.kernels import measure_bandwidth
    from jaxdyn.models.llama import fp8_scale, quantize_fp8
    from pallas_kernels.rms_norm_fp8 import NUM_WARPS, add_rms_norm_fp8_kernel, rms_norm_reference

    d, eps = args.width, 1e-5
    bandwidth = measure_bandwidth(4.0) if args.impl == "kernel" else 1e12
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (this process); {SITES} sites a call, width {d}; "
          f"{jax.devices()[0].device_kind}")

    def xla(x, raw, rs, cs, w):
        h = x + fp8_scale(raw, rs, cs, x.dtype)
        q, s = quantize_fp8(rms_norm_reference(h, w, eps))
        return h, q, s

    def fused(br, nw):
        return lambda x, raw, rs, cs, w: add_rms_norm_fp8_kernel(x, w, (raw, rs, cs), eps=eps, block_rows=br,
                                                                 num_warps=nw, interpret=args.impl == "interpret")

    def chain(site):
        def run(x, raws, rss, cs, ws):
            outs = []
            for raw, rs, w in zip(raws, rss, ws):
                x, q, s = site(x, raw, rs, cs, w)
                outs.append((q, s))
            return x, outs
        return jax.jit(run)

    print(f"the entry point's: 1/{NUM_WARPS}")
    print("\n| rows | floor ms | XLA ms (x floor) | "
          + " | ".join(f"kernel {br}/{nw} ms (x floor, x XLA)" for br, nw in configs) + " |")
    print("|---:|---:|---:|" + "---:|" * len(configs))
    best = {}
    for t in rows:
        k = jax.random.split(jax.random.key(t), 3 * SITES + 2)
        x = jax.random.normal(k[0], (t, d), jnp.bfloat16)
        raws = [(jax.random.normal(k[2 + i], (t, d)) * 300).astype(jnp.bfloat16) for i in range(SITES)]
        rss = [jax.random.uniform(k[2 + SITES + i], (t, 1), minval=1e-3, maxval=1e-2) for i in range(SITES)]
        ws = [(1 + 0.1 * jax.random.normal(k[2 + 2 * SITES + i], (d,))).astype(jnp.bfloat16) for i in range(SITES)]
        cs = jax.random.uniform(k[1], (d,), minval=0.5, maxval=2.0)
        floor = SITES * t * d * (2 + 2 + 2 + 1) / bandwidth
        ops = (x, raws, rss, cs, ws)
        tx = _time(chain(xla), *ops, reps=args.reps)
        cells, times = [], {}
        for br, nw in configs:
            if t % br:
                cells.append("-")
                continue
            times[br, nw] = tk = _time(chain(fused(br, nw)), *ops, reps=args.reps)
            cells.append(f"{tk * 1e3:.3f} ({tk / floor:.2f}, {tk / tx:.3f})")
        print(f"| {t} | {floor * 1e3:.3f} | {tx * 1e3:.3f} ({tx / floor:.2f}) | " + " | ".join(cells) + " |", flush=True)
        if times:
            best[t] = min(times, key=times.get)
    print()
    for t, (br, nw) in best.items():        # machine-readable: a script may take the fastest configuration
        print(f"best at {t} rows: {br}/{nw}")
    print("\nreproduce: python -m benchmarks.gpu.norm_probe " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
