"""Seconds to trace and lower each of an engine's steps as a GPU warm-up does, measured on this machine's CPU.

A warm-up lowers its steps one after another on the calling thread (tracing holds the GIL) and hands each to a
compiling thread once lowered (``ModelRunner._compile_steps``), so the lowering is a serial part of every cold
start. Lowering for a GPU runs without one (``lower(lowering_platforms=("cuda",))``, the Pallas kernels lowered to
Triton as on the device: ``on_gpu`` patched true), so this measures it here: the GPU suite's engine (8B shape by
default, fp8 w8a8 with fp8 KV pages, its ten token buckets and page bucket 128, its ``seq_buckets`` (those the
buckets hold) and ``prefill_programs``, the fused quantization and the
fused norms as on a GPU; the sampler switch a GPU's default, ``plain-full``), abstract weights (no memory for them), every part warm-up compiles (``ModelRunner.part_keys``).

    python benchmarks/lowering_time.py [--model llama-3.1-8b] [--quant fp8|none] [--sampler-switch [plain-full|off]]
                                       [--buckets 16,2048]
                                       [--no-nested-layers]

prints each part's tracing and lowering seconds and their sum.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/lowering_time.py")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--quant", choices=("fp8", "none"), default="fp8")
    ap.add_argument("--sampler-switch", nargs="?", const="all", default="plain-full", choices=("all", "plain-full", "off"),
                    help="RunnerConfig.sampler_switch (default: plain-full, a GPU's)")
    ap.add_argument("--buckets", default=None, help="token buckets (default: the GPU suite's engine's)")
    ap.add_argument("--no-nested-layers", action="store_true",
                    help="trace the layers one by one into each step (RunnerConfig.nested_layers false)")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.gpu.gpu import ENGINE, engine_with
    buckets = ENGINE["token_buckets"]
    if args.buckets:
        try:
            buckets = sorted(int(b) for b in args.buckets.split(","))
        except ValueError:
            ap.error(f"--buckets: expected token counts separated by commas, got {args.buckets!r}")
        if buckets[-1] < ENGINE["max_num_batched_tokens"]:
            ap.error(f"--buckets: the largest must be at least {ENGINE['max_num_batched_tokens']}")
    modules = [importlib.import_module(f"pallas_kernels.{m}") for m in
               ("paged_decode", "ragged_paged_attention", "fp8_quantize", "fp8_matmul", "sampling_thresholds",
                "rms_norm_fp8", "rope_kv")]
    saved = [m.on_gpu for m in modules]
    for m in modules:
        m.on_gpu = lambda: True            # lower as a GPU runs them (put back when done: a caller's process)
    try:
        return _measure(args, engine_with(ENGINE, {"token_buckets": list(buckets)}), buckets)
    finally:
        for m, f in zip(modules, saved):
            m.on_gpu = f


def _measure(args, engine: dict, buckets) -> int:
    from checkpoints.loader import plan_model
    from jaxdyn.engine.core import FP8_FUSED_NORM, FP8_FUSED_QUANTIZE, FP8_FUSED_QUANTIZE_MIN_TOKENS, FUSED_ROPE_KV
    from jaxdyn.engine.runner import ModelRunner, RunnerConfig
    from serving.cli import SAMPLER_SWITCH_FLAG

    quant = None if args.quant == "none" else args.quant
    plan = plan_model(args.model, load_format="dummy", quantization=quant)
    cfg = RunnerConfig(page_size=engine["page_size"], num_pages=1024, max_num_seqs=engine["max_num_seqs"],
                       max_num_batched_tokens=engine["max_num_batched_tokens"], max_model_len=engine["max_model_len"],
                       token_buckets=tuple(buckets), page_buckets=tuple(engine["page_buckets"]),
                       seq_buckets=tuple(map(tuple, engine["seq_buckets"])),
                       prefill_programs=engine.get("prefill_programs"),
                       kv_cache_dtype="fp8" if quant else "auto",
                       fp8_fused_quantize=FP8_FUSED_QUANTIZE if quant else "off",
                       fp8_fused_quantize_min_tokens=FP8_FUSED_QUANTIZE_MIN_TOKENS if quant else 0,
                       fp8_fused_norm=FP8_FUSED_NORM and quant == "fp8", fused_rope_kv=FUSED_ROPE_KV,
                       sampler_switch=SAMPLER_SWITCH_FLAG[args.sampler_switch],
                       nested_layers=not args.no_nested_layers)
    runner = ModelRunner(plan.graphdef, plan.abstract, plan.mesh, cfg)
    keys = runner.part_keys()
    total = 0.0
    print("| part | trace s | lower s |\n|---|---:|---:|")
    for key in keys:
        fn, part_args = runner._part_call(key)
        t0 = time.perf_counter()
        traced = fn.trace(*part_args)
        t1 = time.perf_counter()
        traced.lower(lowering_platforms=("cuda",))
        t2 = time.perf_counter()
        total += t2 - t0
        print(f"| {' '.join(str(k) for k in key)} | {t1 - t0:.2f} | {t2 - t1:.2f} |", flush=True)
    print(f"\n{len(keys)} parts traced and lowered for a GPU in {total:.1f} s on this CPU ({args.model}, "
          f"{args.quant}, sampler_switch={args.sampler_switch}, nested_layers={not args.no_nested_layers})")
    print(f"reproduce: python benchmarks/lowering_time.py --model {args.model} --quant {args.quant}"
          + f" --sampler-switch {args.sampler_switch}" + (f" --buckets {args.buckets}" if args.buckets else "")
          + (" --no-nested-layers" if args.no_nested_layers else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
