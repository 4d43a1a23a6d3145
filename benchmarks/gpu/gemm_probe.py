"""Do merged projections make a step's matrix products cheaper? Separate q/k/v and gate/up against merged ones.

Every layer of a preset's shape (random bf16 weights, 32 distinct layers as the model holds them) runs its
projections on ``M`` rows (a token bucket): separate (q, k, v, o, gate, up, down: seven products a layer),
q/k/v merged (five: as ``jaxdyn.models.llama`` does) and q/k/v and gate/up merged (four), with the MLP's
``silu(gate) * up`` and the residual adds, nothing else, compiled as the engine compiles its steps (XLA's dot
merger off). The separate layout's time per forward is set beside its FLOPs at the bf16 matmul rate and beside
the weights read at the copy bandwidth, both measured in this process.

    python -m benchmarks.gpu.gemm_probe [--model llama-3.1-8b] [--rows 16,128,256,512,1024,2048]

prints one table: rows, ms of each layout, each merged layout / separate, separate / its floor.
"""

from __future__ import annotations

import argparse
import statistics
import time


def probe_args(prog: str, default_rows: str, argv) -> tuple[argparse.Namespace, tuple[int, ...]]:
    """A layer-stack probe's command line (``--model``, ``--rows``, ``--reps``) and its row counts."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rows", default=default_rows)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    try:
        return args, tuple(int(r) for r in args.rows.split(","))
    except ValueError:
        ap.error(f"--rows: expected row counts separated by commas, got {args.rows!r}")


def layer_dims(model: str):
    """(ModelConfig, hidden, intermediate, q features, k/v features) of a preset, and a key per weight it needs."""
    import jax

    from jaxdyn.config import ModelConfig
    from jaxdyn.models.presets import preset_config
    mc = ModelConfig.from_dict(preset_config(model))
    keys = iter(jax.random.split(jax.random.key(0), 8 * mc.num_layers))
    return mc, mc.hidden_size, mc.intermediate_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, keys


def median_time(fn, x, layers, reps: int) -> float:
    """Median seconds of ``fn(x, layers)`` over ``reps`` calls after three unmeasured ones."""
    for _ in range(3):
        fn(x, layers).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x, layers).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    args, rows = probe_args("python -m benchmarks.gpu.gemm_probe", "16,128,256,512,1024,2048", argv)

    import jax
    import jax.numpy as jnp

    from benchmarks.gpu.suite import layers_matmul_params
    from benchmarks.kernels import measure_bandwidth, measure_matmul
    from jaxdyn.engine.runner import NO_DOT_MERGER

    mc, d, f, nq, nkv, keys = layer_dims(args.model)

    def w(shape):
        return (jax.random.normal(next(keys), shape, jnp.bfloat16) * 0.02).astype(jnp.bfloat16)

    sep = [dict(q=w((d, nq)), k=w((d, nkv)), v=w((d, nkv)), o=w((nq, d)), g=w((d, f)), u=w((d, f)),
                dn=w((f, d))) for _ in range(mc.num_layers)]
    for p in sep:
        p["qkv"] = jnp.concatenate([p["q"], p["k"], p["v"]], axis=1)
        p["gu"] = jnp.concatenate([p["g"], p["u"]], axis=1)

    def forward(merge_qkv: bool, merge_gate_up: bool):
        def fwd(x, layers):
            for p in layers:
                if merge_qkv:
                    qkv = x @ p["qkv"]
                    q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
                else:
                    q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
                x = x + (q + jnp.tile(k + v, (1, nq // nkv))) @ p["o"]
                if merge_gate_up:
                    gu = x @ p["gu"]
                    g, u = gu[:, :f], gu[:, f:]
                else:
                    g, u = x @ p["g"], x @ p["u"]
                x = x + (jax.nn.silu(g) * u) @ p["dn"]
            return x
        return fwd

    layouts = (("separate", False, False), ("qkv merged", True, False), ("qkv, gate_up merged", True, True))

    bandwidth, matmul = measure_bandwidth(4.0), measure_matmul(8192)
    params = layers_matmul_params(mc)
    print(f"{args.model}: {mc.num_layers} layers, {params / 1e9:.2f} B projection parameters; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul / 1e12:.0f} TFLOP/s (8192^3, this process)", flush=True)
    print("| rows | " + " | ".join(f"{name} ms" for name, _, _ in layouts) + " | "
          + " | ".join(f"{name} / separate" for name, _, _ in layouts[1:]) + " | separate / floor | separate TFLOP/s |")
    print("|---:|" + "---:|" * (2 * len(layouts) + 1))
    for m in rows:
        x = (jax.random.normal(jax.random.key(m), (m, d), jnp.bfloat16) * 0.1).astype(jnp.bfloat16)
        times = []
        for _, mq, mg in layouts:
            fn = jax.jit(forward(mq, mg)).lower(x, sep).compile(compiler_options=NO_DOT_MERGER)
            times.append(median_time(fn, x, sep, args.reps))
        floor = max(2 * params * 1.0 / bandwidth, 2.0 * params * m / matmul)
        print(f"| {m} | " + " | ".join(f"{t * 1e3:.2f}" for t in times) + " | "
              + " | ".join(f"{t / times[0]:.3f}" for t in times[1:])
              + f" | {times[0] / floor:.2f} | {2.0 * params * m / times[0] / 1e12:.0f} |", flush=True)
    print(f"reproduce: python -m benchmarks.gpu.gemm_probe --model {args.model} --rows {args.rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
