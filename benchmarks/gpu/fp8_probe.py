"""What would fp8 matrix products buy a step? A layer stack's projections in bf16 against fp8 ones.

Every layer of a preset's shape (random weights, 32 distinct layers as the model holds them, q/k/v merged as
``jaxdyn.models.llama`` does) runs its projections on ``M`` rows (a token bucket) with the MLP's
``silu(gate) * up`` and the residual adds, nothing else, compiled as the engine compiles its steps (XLA's dot
merger off), in these forms:

- ``bf16``: the model's products;
- ``w8a8``: fp8 (e4m3) weights stored ``[out, in]`` (the contracting dimension minor, the layout cuBLASLt's
  fp8 products take) with a float32 scale per output channel, and each product's input quantized to fp8 with
  one scale per tensor found on the device (its absolute maximum / 448): the product of two fp8 operands, its
  bf16 result times the two scales;
- ``w8a8 [in, out]``: the same with the weights ``[in, out]`` (as the model stores them now): whatever XLA
  does with a layout cuBLASLt's fp8 products do not take (a transposed copy of each weight would show here);
- ``w8a8 static``: the activations' scale a constant (no maximum found on the device): what that search costs;
- ``w8 only``: fp8 weights made bf16 inside the product (jaxdyn's fp8 before this probe; its int8 path still).

    python -m benchmarks.gpu.fp8_probe [--model llama-3.1-8b] [--rows 16,128,768,2048]

prints one table: rows, ms of each form, each form / bf16, bf16 / its floor; and, per form, the compiled
program's custom-call targets of the products (``__cublas$lt$matmul$f8`` is cuBLASLt's fp8 product) and the
number of its transposes and copies.
"""

from __future__ import annotations

import collections
import re


def hlo_summary(text: str) -> str:
    """The custom-call targets (counted) and the transposes and copies of a compiled HLO text."""
    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    fusions = collections.Counter(re.findall(r"kind=k(\w+)", text))
    transposes = len(re.findall(r"= \S+ transpose\(", text))
    copies = len(re.findall(r"= \S+ copy\(", text))
    return (", ".join(f"{t} x{n}" for t, n in sorted(targets.items())) or "no custom calls") + \
        f"; fusions {dict(fusions)}; transposes {transposes}, copies {copies}"


def time_forms(forms: dict, x, params, reps: int, summaries: dict) -> list[float]:
    """Median seconds of each of ``forms`` (name -> ``fn(x, params)``), in order, each compiled as the engine
    compiles its steps (XLA's dot merger off); the HLO summary (``hlo_summary``) of each form's first compile goes
    into ``summaries``."""
    import jax

    from benchmarks.gpu.gemm_probe import median_time
    from jaxdyn.engine.runner import NO_DOT_MERGER
    times = []
    for name, f in forms.items():
        fn = jax.jit(f).lower(x, params).compile(compiler_options=NO_DOT_MERGER)
        summaries.setdefault(name, hlo_summary(fn.as_text()))
        times.append(median_time(fn, x, params, reps))
    return times


def print_summaries(summaries: dict) -> None:
    for name, s in summaries.items():
        print(f"- {name}: {s}")


def main(argv=None) -> int:
    from benchmarks.gpu.gemm_probe import layer_dims, probe_args
    args, rows = probe_args("python -m benchmarks.gpu.fp8_probe", "16,128,768,2048", argv)

    import jax
    import jax.numpy as jnp
    from jax import lax

    from benchmarks.gpu.suite import layers_matmul_params
    from benchmarks.kernels import measure_bandwidth, measure_matmul

    mc, d, f, nq, nkv, keys = layer_dims(args.model)
    f8 = jnp.float8_e4m3fn
    shapes = dict(qkv=(d, nq + 2 * nkv), o=(nq, d), g=(d, f), u=(d, f), dn=(f, d))

    def make(shape):
        w = jax.random.normal(next(keys), shape, jnp.float32) * shape[0] ** -0.5
        scale = jnp.max(jnp.abs(w), axis=0) / 448.0
        return dict(bf16=w.astype(jnp.bfloat16), kn=(w / scale).astype(f8), nk=(w / scale).astype(f8).T,
                    scale=scale)

    layers = [{name: make(shape) for name, shape in shapes.items()} for _ in range(mc.num_layers)]

    def quantize(x, static):
        s = jnp.float32(0.05) if static else jnp.maximum(jnp.max(jnp.abs(x)).astype(jnp.float32), 1e-6) / 448.0
        return (x.astype(jnp.float32) / s).astype(f8), s

    def linear(form):
        def bf16(x, p):
            return x @ p["bf16"]

        def w8a8(x, p, layout="nk", static=False):
            xq, s = quantize(x, static)
            w = p[layout]
            dims = (((1,), (1,)), ((), ())) if layout == "nk" else (((1,), (0,)), ((), ()))
            y = lax.dot_general(xq, w, dims, preferred_element_type=jnp.bfloat16)
            return (y.astype(jnp.float32) * (s * p["scale"])).astype(jnp.bfloat16)

        def w8(x, p):
            y = jnp.dot(x, p["kn"].astype(x.dtype), preferred_element_type=jnp.float32)
            return (y * p["scale"]).astype(x.dtype)

        return {"bf16": bf16, "w8a8": w8a8, "w8a8 [in, out]": lambda x, p: w8a8(x, p, "kn"),
                "w8a8 static": lambda x, p: w8a8(x, p, static=True), "w8 only": w8}[form]

    def forward(form):
        lin = linear(form)

        def fwd(x, layers):
            for p in layers:
                qkv = lin(x, p["qkv"])
                q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
                x = x + lin(q + jnp.tile(k + v, (1, nq // nkv)), p["o"])
                x = x + lin(jax.nn.silu(lin(x, p["g"])) * lin(x, p["u"]), p["dn"])
            return x
        return fwd

    forms = ("bf16", "w8a8", "w8a8 [in, out]", "w8a8 static", "w8 only")

    bandwidth, matmul = measure_bandwidth(4.0), measure_matmul(8192)
    params = layers_matmul_params(mc)
    print(f"{args.model}: {mc.num_layers} layers, {params / 1e9:.2f} B projection parameters; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul / 1e12:.0f} TFLOP/s (8192^3, this process)", flush=True)
    print("| rows | " + " | ".join(f"{name} ms" for name in forms) + " | "
          + " | ".join(f"{name} / bf16" for name in forms[1:]) + " | bf16 / floor | bf16 TFLOP/s | w8a8 TFLOP/s |")
    print("|---:|" + "---:|" * (2 * len(forms) + 2))
    summaries = {}
    for m in rows:
        x = (jax.random.normal(jax.random.key(m), (m, d), jnp.float32) * 0.5).astype(jnp.bfloat16)
        times = time_forms({form: forward(form) for form in forms}, x, layers, args.reps, summaries)
        floor = max(2 * params * 1.0 / bandwidth, 2.0 * params * m / matmul)
        print(f"| {m} | " + " | ".join(f"{t * 1e3:.2f}" for t in times) + " | "
              + " | ".join(f"{t / times[0]:.3f}" for t in times[1:])
              + f" | {times[0] / floor:.2f} | {2.0 * params * m / times[0] / 1e12:.0f} | "
              f"{2.0 * params * m / times[1] / 1e12:.0f} |", flush=True)
    print_summaries(summaries)
    print(f"reproduce: python -m benchmarks.gpu.fp8_probe --model {args.model} --rows {args.rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
