"""Where a decode step's device time goes: GPU kernel time by kernel, from a JAX profiler trace.

For each (batch, context) point it runs a few compiled steps of the model
(random bf16 weights, as ``benchmarks/gpu/step.py``) under
``jax.profiler.trace(..., create_perfetto_trace=True)``, reads the Perfetto
JSON it writes, and prints the GPU kernels that take the most time per step,
grouped by kernel name, with their share of the step. It also saves the
optimised HLO of each step (``--hlo-dir``) to read for copies and fusions.
``--sampler`` picks the sampler variant the step is compiled with (the rows are
greedy, so ``plain`` and ``full`` compute their extra parts and discard them):
the difference to ``greedy`` is what that variant costs.

    python -m benchmarks.gpu.profile_step --model llama-3.1-8b --points 8x2048,64x2048 \
        [--sampler greedy|plain|full] [--hlo-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np

from benchmarks.gpu.step import decode_runner, decode_work, run_back_to_back
from checkpoints.loader import load_model
from jaxdyn.engine.sampler import GREEDY, VARIANTS


def kernel_times(trace_dir: str) -> tuple[dict[str, float], float]:
    """({kernel name: total µs}, GPU span µs) from the Perfetto trace under ``trace_dir``."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and re.search(r"/device:GPU|GPU:|stream", str(e.get("args", {}).get("name", "")))}
    # a GPU's timeline has stream lines (kernels) beside summary lines (XLA modules / ops):
    # count the stream lines only, so nothing is counted twice
    threads = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu_pids}
    streams = {k for k, v in threads.items() if "stream" in v.lower()}
    print("GPU timeline lines:", sorted(set(threads.values())), flush=True)
    totals: dict[str, float] = collections.defaultdict(float)
    start, end = float("inf"), 0.0
    for e in events:
        if (e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e
                and (not streams or (e["pid"], e.get("tid")) in streams)):
            name = re.sub(r"[._]\d+$", "", e["name"])
            totals[name] += float(e["dur"])
            start, end = min(start, float(e["ts"])), max(end, float(e["ts"]) + float(e["dur"]))
    return dict(totals), max(end - start, 0.0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--points", default="8x2048,64x2048", help="batch x context, comma-separated")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--hlo-dir", default=None, help="write each step's optimised HLO here (gzip)")
    ap.add_argument("--sampler", choices=VARIANTS, default=GREEDY,
                    help="sampler variant of the step (greedy: argmax only, what greedy rows get)")
    args = ap.parse_args(argv)
    points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    mesh, loaded, _ = load_model(args.model, load_format="dummy", dtype="bfloat16")
    rng = np.random.default_rng(0)
    runner = decode_runner(loaded, mesh, points)
    for b, c in points:
        compiled, dev_args, _ = runner.prepare(decode_work(rng, runner, loaded.config.vocab_size, b, c),
                                               args.sampler)
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            name = f"{args.model}_b{b}_c{c}_{args.sampler}.hlo.txt.gz"
            with gzip.open(os.path.join(args.hlo_dir, name), "wt") as f:
                f.write(compiled.as_text())
        jax.block_until_ready(run_back_to_back(runner, compiled, dev_args, 3))
        # host time to dispatch a step (no wait) and wall time per step, outside the profiler
        t0 = time.perf_counter()
        sampled = run_back_to_back(runner, compiled, dev_args, args.steps)
        dispatch = (time.perf_counter() - t0) / args.steps
        jax.block_until_ready(sampled)
        wall = (time.perf_counter() - t0) / args.steps
        trace_dir = tempfile.mkdtemp()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            jax.block_until_ready(run_back_to_back(runner, compiled, dev_args, args.steps))
        totals, span = kernel_times(trace_dir)
        busy = sum(totals.values())
        print(f"\n{args.model} batch {b} context {c} sampler {args.sampler}: wall {wall * 1e3:.2f} ms/step, "
              f"host dispatch {dispatch * 1e3:.2f} ms/step; profiled: GPU span {span / args.steps / 1e3:.2f} ms/step, "
              f"kernels busy {busy / args.steps / 1e3:.2f} ms/step", flush=True)
        print("| kernel | µs / step | share of busy |\n|---|---:|---:|")
        for name, us in sorted(totals.items(), key=lambda kv_: -kv_[1])[:args.top]:
            print(f"| {name[:90]} | {us / args.steps:.1f} | {us / busy:.3f} |")


if __name__ == "__main__":
    main()
