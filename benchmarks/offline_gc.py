"""Python's garbage collections during an offline ``LLM.generate`` run on the CPU (final outputs only).

The engine is ``engine_host_time``'s ``--preset`` engine (Llama-3.1-8B's depth cut to ``--layers``, its
vocabulary, hidden 64, random weights); ``--requests`` prompts of 16-120 random tokens, greedy, 8-120 output
tokens each (``ignore_eos``), all submitted at once as ``jaxdyn bench offline`` does. Prints the run's steps, host
ms a step and every collection while it ran, by generation, with and without ``--gc-freeze``
(``EngineConfig.gc_freeze``: the heap settled after warm-up).

    python benchmarks/offline_gc.py [--gc-freeze] [--requests 600] [--layers 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--gc-freeze", action="store_true", help="EngineConfig.gc_freeze (off on the CPU by default)")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.layers < 1:
        ap.error("--requests and --layers must be at least 1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.engine_host_time import TINY_WIDTH, gc_pauses
    from benchmarks.gpu.suite import model_dir
    from jaxdyn import LLM, SamplingParams

    d = model_dir("llama-3.1-8b", tempfile.mkdtemp(), **dict(TINY_WIDTH, num_hidden_layers=args.layers))
    llm = LLM(d, dtype="float32", load_format="dummy", num_pages=4096, page_size=16, max_num_batched_tokens=512,
              max_num_seqs=256, max_model_len=256, token_buckets=(64, 256, 512), page_buckets=(16,), seed=0,
              gc_freeze=args.gc_freeze or None)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 100_000, int(rng.integers(16, 120))).tolist() for _ in range(args.requests)]
    params = [SamplingParams(temperature=0, max_tokens=int(rng.integers(8, 120)), ignore_eos=True) for _ in prompts]
    eng = llm.engine
    s0, h0, w0 = eng.metrics.steps, eng.host_time, eng.wait_time
    t0 = time.perf_counter()
    with gc_pauses() as pauses:
        out = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    steps = eng.metrics.steps - s0
    host = (eng.host_time - h0) - (eng.wait_time - w0)
    by_gen = {g: (sum(1 for x, _ in pauses if x == g), sum(p for x, p in pauses if x == g) * 1e3) for g in range(3)}
    cmd = "python benchmarks/offline_gc.py" + (" --gc-freeze" if args.gc_freeze else "") + \
        (f" --requests {args.requests}" if args.requests != 600 else "") + \
        (f" --layers {args.layers}" if args.layers != 4 else "")
    print(f"{len(out)} requests, {steps} steps, wall {wall:.1f} s, host {host / steps * 1e3:.2f} ms a step; "
          f"{len(pauses)} collections, {sum(p for _, p in pauses) * 1e3:.1f} ms in all, longest "
          f"{max((p for _, p in pauses), default=0.0) * 1e3:.1f} ms; by generation (count, ms): "
          + ", ".join(f"{g}: ({n}, {ms:.1f})" for g, (n, ms) in by_gen.items()))
    print(f"reproduce: {cmd}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
