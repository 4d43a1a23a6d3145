"""Where a decode step's device time goes: GPU kernel time by kernel, from a JAX profiler trace.

For each (batch, context) point it runs a few compiled steps of the model
(random bf16 weights, as ``benchmarks/gpu/step.py``) under
``jax.profiler.trace(..., create_perfetto_trace=True)``, reads the Perfetto
JSON it writes, and prints the GPU kernels that take the most time per step,
grouped by kernel name, with their share of the step. It also saves the
optimised HLO of each step (``--hlo-dir``) to read for copies and fusions.
``--sampler`` picks the sampler variant the step is compiled with (the rows are
greedy, so ``plain`` and ``full`` compute their extra parts and discard them):
the difference to ``greedy`` is what that variant costs, as the engine runs it: on a GPU
``plain`` and ``full`` are by default the branches of their bucket's switch
(``RunnerConfig.sampler_switch``), so their steps (and saved HLO) are the switch's.

    python -m benchmarks.gpu.profile_step --model llama-3.1-8b --points 8x2048,64x2048 \
        [--sampler greedy|random|plain|full] [--hlo-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time

import jax
import numpy as np

from benchmarks.gpu.step import decode_runner, decode_work, run_back_to_back
from checkpoints.loader import load_model
from jaxdyn.engine.sampler import GREEDY, VARIANTS


def trace_path(trace_dir: str) -> str:
    return sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]


def _trace(trace_dir: str) -> tuple[list[dict], set]:
    """(the trace's events, the process ids of its GPU timelines)."""
    with gzip.open(trace_path(trace_dir)) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and re.search(r"/device:GPU|GPU:|stream", str(e.get("args", {}).get("name", "")))}
    return events, gpu_pids


def kernel_events(trace_dir: str) -> list[tuple[float, float, str]]:
    """[(start µs, duration µs, kernel name)] of the GPU stream lines of the trace, in time order."""
    events, gpu_pids = _trace(trace_dir)
    # a GPU's timeline has stream lines (kernels) beside summary lines (XLA modules / ops):
    # count the stream lines only, so nothing is counted twice
    threads = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu_pids}
    streams = {k for k, v in threads.items() if "stream" in v.lower()}
    print("GPU timeline lines:", sorted(set(threads.values())), flush=True)
    return sorted((float(e["ts"]), float(e["dur"]), re.sub(r"[._]\d+$", "", e["name"]))
                  for e in events
                  if (e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e
                      and (not streams or (e["pid"], e.get("tid")) in streams)))


def host_events(trace_dir: str) -> dict[str, tuple[int, float]]:
    """{event name: (count, total µs)} of the trace's host lines (every process but the GPUs': XLA's and PJRT's
    annotations of dispatch, transfers, launches and command-buffer updates; the Python tracer's frames left
    out), numbered suffixes dropped. Nested events each count their whole span, so the totals rank where the
    host spends time; they do not add up."""
    events, gpu_pids = _trace(trace_dir)
    totals: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if (e.get("ph") == "X" and "dur" in e and e.get("pid") not in gpu_pids
                and not str(e.get("name", "")).startswith("$")):      # "$file.py:N f": Python's frames
            t = totals[re.sub(r"[._]\d+$", "", str(e["name"]))]
            t[0] += 1
            t[1] += float(e["dur"])
    return {k: (n, us) for k, (n, us) in totals.items()}


def kernel_times(events: list[tuple[float, float, str]]) -> tuple[dict[str, float], float]:
    """({kernel name: total µs}, GPU span µs) of ``kernel_events``."""
    totals: dict[str, float] = collections.defaultdict(float)
    for _, dur, name in events:
        totals[name] += dur
    span = max(ts + dur for ts, dur, _ in events) - events[0][0] if events else 0.0
    return dict(totals), span


def idle_gaps(events: list[tuple[float, float, str]]) -> dict[tuple[str, str], list[float]]:
    """{(kernel before, kernel after): [idle µs]}: where the GPU waits between kernels."""
    gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    end, prev = None, None
    for ts, dur, name in events:
        if end is not None and ts > end:
            gaps[(prev, name)].append(ts - end)
        if end is None or ts + dur > end:
            end, prev = ts + dur, name
    return gaps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--points", default="8x2048,64x2048", help="batch x context, comma-separated")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--hlo-dir", default=None, help="write each step's optimised HLO here (gzip)")
    ap.add_argument("--trace-out", default=None,
                    help="copy each point's Perfetto trace (.json.gz) into this folder")
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
        events = kernel_events(trace_dir)
        totals, span = kernel_times(events)
        busy = sum(totals.values())
        if args.trace_out:
            os.makedirs(args.trace_out, exist_ok=True)
            shutil.copy(trace_path(trace_dir), os.path.join(
                args.trace_out, f"{args.model}_b{b}_c{c}_{args.sampler}.trace.json.gz"))
        print(f"\n{args.model} batch {b} context {c} sampler {args.sampler}: wall {wall * 1e3:.2f} ms/step, "
              f"host dispatch {dispatch * 1e3:.2f} ms/step; profiled: GPU span {span / args.steps / 1e3:.2f} ms/step, "
              f"kernels busy {busy / args.steps / 1e3:.2f} ms/step", flush=True)
        print("| kernel | µs / step | share of busy |\n|---|---:|---:|")
        for name, us in sorted(totals.items(), key=lambda kv_: -kv_[1])[:args.top]:
            print(f"| {name[:90]} | {us / args.steps:.1f} | {us / busy:.3f} |")
        gaps = idle_gaps(events)
        idle = sum(sum(g) for g in gaps.values())
        print(f"\nGPU idle between kernels: {idle / args.steps / 1e3:.2f} ms/step; "
              f"where (kernel before -> kernel after):")
        print("| before | after | gaps / step | idle µs / step | mean µs |\n|---|---|---:|---:|---:|")
        for (before, after), g in sorted(gaps.items(), key=lambda kv_: -sum(kv_[1]))[:args.top]:
            print(f"| {before[:50]} | {after[:50]} | {len(g) / args.steps:.1f} | "
                  f"{sum(g) / args.steps:.1f} | {np.mean(g):.2f} |")


if __name__ == "__main__":
    main()
