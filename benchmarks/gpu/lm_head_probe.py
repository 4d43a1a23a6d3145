"""What does an fp8 lm_head buy? The logits of ``M`` rows through the 8B shape's head in the forms the model has.

- ``bf16``: the float head, ``[hidden, vocab]`` bf16, products in float32 (``LlamaForCausalLM.compute_logits``);
- ``fp8 f32``: ``jaxdyn.models.llama.fp8_logits`` with its product in float32 (``--quantize-lm-head`` as committed
  first);
- ``fp8 bf16``: the same product in bf16, made float32 before the scales (as the decoder's w8a8 products are);
- ``w8a16``: the fp8 weights made bf16 inside the product (no activation quantization).

    python -m benchmarks.gpu.lm_head_probe [--model llama-3.1-8b] [--rows 16,64,256,768,1024]

prints one table: rows, ms of each form, each form / bf16, and bf16's floor (its weight bytes at the copy rate or
its products at the bf16 matmul rate, whichever is longer); then, per form, the compiled program's custom-call
targets (``__cublas$lt$matmul$f8`` is cuBLASLt's fp8 product) and its fusions.
"""

from __future__ import annotations


def main(argv=None) -> int:
    from benchmarks.gpu.gemm_probe import probe_args
    args, rows = probe_args("python -m benchmarks.gpu.lm_head_probe", "16,64,256,768,1024", argv)

    import jax
    import jax.numpy as jnp

    from benchmarks.gpu.fp8_probe import print_summaries, time_forms
    from benchmarks.kernels import measure_bandwidth, measure_matmul
    from jaxdyn.config import ModelConfig
    from jaxdyn.models.llama import fp8_logits
    from jaxdyn.models.presets import preset_config

    mc = ModelConfig.from_dict(preset_config(args.model))
    d, v = mc.hidden_size, mc.vocab_size
    w = jax.random.normal(jax.random.key(0), (v, d), jnp.float32) * d ** -0.5
    scale = jnp.max(jnp.abs(w), axis=1) / 448.0
    head = dict(kernel=w.T.astype(jnp.bfloat16), weight=(w / scale[:, None]).astype(jnp.float8_e4m3fn), scale=scale)
    del w

    forms = {
        "bf16": lambda x, h: jnp.einsum("nd,dv->nv", x, h["kernel"], preferred_element_type=jnp.float32),
        "fp8 f32": lambda x, h: fp8_logits(x, h["weight"], h["scale"], jnp.float32),
        "fp8 bf16": lambda x, h: fp8_logits(x, h["weight"], h["scale"], jnp.bfloat16),
        "w8a16": lambda x, h: jnp.einsum("nd,vd->nv", x, h["weight"].astype(x.dtype),
                                         preferred_element_type=jnp.float32) * h["scale"],
    }
    bandwidth, matmul = measure_bandwidth(4.0), measure_matmul(8192)
    print(f"{args.model} head: [{d}, {v}]; copy bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul "
          f"{matmul / 1e12:.0f} TFLOP/s (8192^3, this process)", flush=True)
    names = list(forms)
    print("| rows | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} / bf16" for n in names[1:]) + " | bf16 / floor |")
    print("|---:|" + "---:|" * (2 * len(names)))
    summaries = {}
    for m in rows:
        x = (jax.random.normal(jax.random.key(m), (m, d), jnp.float32)).astype(jnp.bfloat16)
        times = time_forms(forms, x, head, args.reps, summaries)
        floor = max(2.0 * d * v / bandwidth, 2.0 * m * d * v / matmul)
        print(f"| {m} | " + " | ".join(f"{t * 1e3:.3f}" for t in times) + " | "
              + " | ".join(f"{t / times[0]:.3f}" for t in times[1:]) + f" | {times[0] / floor:.2f} |", flush=True)
    print_summaries(summaries)
    print(f"reproduce: python -m benchmarks.gpu.lm_head_probe --model {args.model} --rows {args.rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
