"""Whether nesting the layers (``RunnerConfig.nested_layers``) leaves a compiled step as it was: each part of a
bucket compiled both ways on this machine's backend, and the optimized programs' instructions compared.

With ``nested_layers`` a step traces one decoder layer and inlines its jaxpr for every layer, so the compiled program
should be the one the layers traced one by one make. This checks it where it matters (on a GPU, ``--quant fp8`` as
the suite's engine) and says what differs if anything does: the optimized HLO's instructions counted by opcode and
result type (names and metadata left out), fusions by kind, and each configuration's lowering and compile seconds.

    python benchmarks/nested_layers_check.py [--model llama-3.1-8b] [--quant fp8|none] [--buckets 16,2048]
        [--sampler-switch [plain-full|off]] [--layers N] [--dtype bfloat16|float32]

``--layers``: the preset at that depth (a narrower check on a CPU). Weights are abstract (nothing loaded).
Exit status 0 either way; the last line says ``same`` or ``differ``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z][\w\-]*)\(")
_FUSION_KIND = re.compile(r"kind=(k\w+)")


def census(hlo_text: str) -> collections.Counter:
    """Instructions of an optimized HLO module's text by (opcode, result type), and fusions by kind."""
    counts: collections.Counter = collections.Counter()
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        shape = re.sub(r"\{[^{}]*\}", "", m.group(1))          # layouts out: the types and dimensions stay
        counts[(m.group(2), shape)] += 1
        if m.group(2) == "fusion":
            k = _FUSION_KIND.search(line)
            counts[("fusion kind", k.group(1) if k else "?")] += 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/nested_layers_check.py")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--quant", choices=("fp8", "none"), default="fp8")
    ap.add_argument("--buckets", default="16,2048", help="token buckets to compile (the largest: the step budget)")
    ap.add_argument("--sampler-switch", nargs="?", const="all", default=None, choices=("all", "plain-full", "off"),
                    help="RunnerConfig.sampler_switch (default: by device, plain-full on a GPU)")
    ap.add_argument("--layers", type=int, default=None, help="the preset at this depth")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: the preset's")
    args = ap.parse_args(argv)
    try:
        buckets = sorted(int(b) for b in args.buckets.split(","))
    except ValueError:
        ap.error(f"--buckets: expected token counts separated by commas, got {args.buckets!r}")
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers: expected at least 1, got {args.layers}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    from benchmarks.gpu.suite import model_dir
    from checkpoints.loader import plan_model
    from jaxdyn.engine.core import FP8_FUSED_NORM, FP8_FUSED_QUANTIZE, FP8_FUSED_QUANTIZE_MIN_TOKENS, FUSED_ROPE_KV
    from jaxdyn.engine.runner import ModelRunner, RunnerConfig
    from serving.cli import SAMPLER_SWITCH_FLAG

    quant = None if args.quant == "none" else args.quant
    model = args.model if args.layers is None else model_dir(args.model, tempfile.mkdtemp(),
                                                             num_hidden_layers=args.layers)
    plan = plan_model(model, load_format="dummy", quantization=quant, dtype=args.dtype)
    gpu = jax.default_backend() == "gpu"
    results = {}
    for nested in (True, False):
        cfg = RunnerConfig(page_size=16, num_pages=1024, max_num_seqs=min(256, buckets[-1]),
                           max_num_batched_tokens=buckets[-1], max_model_len=4096, token_buckets=tuple(buckets),
                           page_buckets=(128,), kv_cache_dtype="fp8" if quant else "auto",
                           fp8_fused_quantize=FP8_FUSED_QUANTIZE if quant and gpu else "off",
                           fp8_fused_quantize_min_tokens=FP8_FUSED_QUANTIZE_MIN_TOKENS if quant and gpu else 0,
                           fp8_fused_norm=FP8_FUSED_NORM and quant == "fp8" and gpu,
                           fused_rope_kv=FUSED_ROPE_KV and gpu,
                           sampler_switch=SAMPLER_SWITCH_FLAG[args.sampler_switch], nested_layers=nested)
        runner = ModelRunner(plan.graphdef, plan.abstract, plan.mesh, cfg)
        keys = runner.part_keys()
        for key in keys:
            t0 = time.perf_counter()
            lowered = runner._lower_part(key)
            t1 = time.perf_counter()
            compiled = runner.compile(lowered, key[1])
            t2 = time.perf_counter()
            results[(key, nested)] = (t1 - t0, t2 - t1, census(compiled.as_text()))
        del runner
    parts = list(dict.fromkeys(k for k, _ in results))
    print(f"{args.model}{f' at {args.layers} layers' if args.layers else ''}, quant {args.quant}, "
          f"{jax.devices()[0].device_kind}\n")
    print("| part | nested: lower s | compile s | unrolled: lower s | compile s | instructions nested / unrolled "
          "| differing (opcode, type) |\n|---|---:|---:|---:|---:|---|---:|")
    differ = 0
    for key in parts:
        ln, cn, a = results[(key, True)]
        lu, cu, b = results[(key, False)]
        diff = {k: (a.get(k, 0), b.get(k, 0)) for k in set(a) | set(b) if a.get(k, 0) != b.get(k, 0)}
        differ += bool(diff)
        print(f"| {' '.join(str(k) for k in key)} | {ln:.2f} | {cn:.2f} | {lu:.2f} | {cu:.2f} | "
              f"{sum(a.values())} / {sum(b.values())} | {len(diff)} |")
        for k, (x, y) in sorted(diff.items(), key=lambda kv: str(kv[0]))[:20]:
            print(f"    {k[0]} {k[1]}: nested {x}, unrolled {y}")
    print("\nreproduce: python benchmarks/nested_layers_check.py --model " + args.model + f" --quant {args.quant}"
          + f" --buckets {args.buckets}" + (f" --sampler-switch {args.sampler_switch}" if args.sampler_switch else "")
          + (f" --layers {args.layers}" if args.layers else "") + (f" --dtype {args.dtype}" if args.dtype else ""))
    print(f"compiled programs: {'same' if not differ else 'differ'} ({differ} of {len(parts)} parts differ)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
