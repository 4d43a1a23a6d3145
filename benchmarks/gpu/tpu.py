"""The benchmark suite on one TPU host, with the GPU entry's interface; untested on a TPU (only ``--dry-run``).

    python -m benchmarks.gpu.tpu --out DIR [--quick] [--sections ...] [--budget-s N] [--model PRESET] [--list]
    python -m benchmarks.gpu.tpu --dry-run --out DIR      # the plumbing, on the CPU

What differs from ``gpu.py``:

- no ``kernels`` section: jaxdyn's Pallas kernels are GPU (Triton) kernels and
  the model's attention on a TPU is the jax.numpy reference. ``ceilings``
  takes its place: the same copy-bandwidth and matmul measurements
  (``benchmarks.kernels.measure_bandwidth`` / ``measure_matmul``) and the
  reference decode attention timed against the bandwidth;
- a TPU is opened by one process at a time: the serve section's driver and the
  ``bench serve`` client run with ``JAX_PLATFORMS=cpu`` (as on the GPU), and the
  two server starts never overlap. No ``XLA_PYTHON_CLIENT_MEM_FRACTION``;
- the KV pool is smaller (6,144 pages: 12.9 GB for the 8B shape, beside its
  16 GB of weights), so the 8B shape fits a 32 GB chip (v6e, v4); a 16 GB chip
  (v5e) needs ``--model llama-3.2-1b``.

Budgets: probe 30, serve 230, offline 75, host 50, step 150, ceilings 50, in two device calls (serve and
offline; host, step and ceilings).
"""

from __future__ import annotations

import sys

from benchmarks.gpu import gpu, suite

DATASHEETS = (   # Google Cloud TPU documentation, per chip: HBM bandwidth, bf16 peak
    ("TPU v6 lite", 1.64e12, 918e12, "Cloud TPU v6e (Trillium): 1,640 GB/s HBM, 918 TFLOP/s bf16"),
    ("TPU v5 lite", 0.819e12, 197e12, "Cloud TPU v5e: 819 GB/s HBM, 197 TFLOP/s bf16"),
    ("TPU v5p", 2.765e12, 459e12, "Cloud TPU v5p: 2,765 GB/s HBM, 459 TFLOP/s bf16"),
    ("TPU v5", 2.765e12, 459e12, "Cloud TPU v5p: 2,765 GB/s HBM, 459 TFLOP/s bf16"),
    ("TPU v4", 1.2e12, 275e12, "Cloud TPU v4: 1,200 GB/s HBM, 275 TFLOP/s bf16"),
)

# 128 slots (the 2,048 bucket's own: engine_with drops its seq_buckets pair); the prefill programs' count is an H100's
ENGINE = gpu.engine_with(gpu.ENGINE, dict(num_pages=6144, max_num_seqs=128, token_buckets=[16, 128, 2048],
                                          prefill_programs=None))


def plan(quick: bool = False, model: str = "llama-3.1-8b", offline_prompts: int | None = None,
         full_grid: bool = False, quant: str | None = None) -> suite.Plan:
    host_engine = gpu.engine_with(ENGINE, dict(token_buckets=[16, 64, 128, 2048], enable_prefix_caching=False))
    # batch 256 of the GPU plans needs more KV than a 32 GB chip has beside the 8B weights: 128 instead
    step_models = [dict(m, batches=sorted({min(b, 128) for b in m["batches"]}))
                   for m in gpu.step_models(quick, model, full_grid)]
    runs = [dict(r, num_prompts=min(r["num_prompts"], 128)) for r in gpu.serve_runs(quick)]
    return suite.Plan(
        name="tpu" + (" (quick)" if quick else ""), entry="benchmarks.gpu.tpu", expect_platform="tpu",
        env={k: v for k, v in gpu.PLAN_ENV.items() if not k.startswith("XLA_PYTHON")},   # that one is GPU-only
        datasheets=DATASHEETS, probe_budget_s=30, notes=gpu.plan(quick).notes,
        calls=(("serve", "offline"), ("host", "step", "ceilings")),
        sections=(
            suite.serve_section(180 if quick else 230, model=model, engine=ENGINE, runs=runs, ready_timeout_s=170,
                                warm_reserve_s=40, server_env={}, quant=quant),
            suite.offline_section(60 if quick else 75, model=model, engine=ENGINE,
                                  datasets=gpu.offline_datasets(quick, offline_prompts or (100 if quick else 300)),
                                  quant=quant),
            suite.host_section(45 if quick else 50, model=model, engine=host_engine,
                               batches=[64] if quick else [64, 128], prompt_len=512, max_tokens=1024, steps=30,
                               quant=quant),
            suite.step_section(step_models, bandwidth_gib=4.0, matmul_n=8192),
            suite.ceilings_section(50, bandwidth_gib=4.0, matmul_n=8192,
                                   points=[(1, 2048), (8, 2048), (32, 2048), (128, 2048)]),
        ))


def main(argv=None) -> int:
    return suite.main(argv, plan_factory=plan, entry="benchmarks.gpu.tpu", dry_first="ceilings")


if __name__ == "__main__":
    sys.exit(main())
