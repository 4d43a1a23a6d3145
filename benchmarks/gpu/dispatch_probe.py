"""Does dispatching the engine's compiled step wait for the device? Host time of the call, device idle and busy.

The runner's compiled step of each token bucket (random weights in a preset's shapes, padding inputs as
``ModelRunner.measure_step_costs`` runs them) is called:

- with the device idle (each call after the previous step finished): the call's own host cost;
- back to back (each call right after the previous one returned, as the engine's overlapped loop does): if the
  call returns only once the previous step is (nearly) done, its time approaches the device's step time and the
  host cannot run ahead.

Each either with the step's small inputs as host numpy arrays (what the engine passes) or already on the device,
and with one executable or two copies of it called in turn (``twins``: a second copy deserialized from the first;
XLA records a command buffer -- a CUDA graph -- per executable and re-records it when a buffer it uses moved since
its last call, and buffers that are still alive when the next step is dispatched move every call; two copies
called in turn each see the same buffers every other step).

    python -m benchmarks.gpu.dispatch_probe [--model llama-3.1-8b] [--buckets 16,512] [--steps 20]

Run it under different ``XLA_FLAGS`` (e.g. ``--xla_gpu_enable_command_buffer=``) to compare; the flags in effect
are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.dispatch_probe")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--buckets", default="16,512")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    try:
        buckets = tuple(int(b) for b in args.buckets.split(","))
    except ValueError:
        ap.error(f"--buckets: expected token counts separated by commas, got {args.buckets!r}")

    import jax
    from jax.experimental import serialize_executable

    from checkpoints.loader import load_model
    from jaxdyn.engine.runner import ModelRunner, RunnerConfig
    from jaxdyn.engine.sampler import VARIANTS

    mesh, loaded, _ = load_model(args.model, load_format="dummy", dtype="bfloat16")
    runner = ModelRunner(loaded.graphdef, loaded.state, mesh, RunnerConfig(
        page_size=16, num_pages=8192, max_num_seqs=max(buckets), max_num_batched_tokens=max(buckets),
        max_model_len=2048, token_buckets=buckets, page_buckets=(128,)))
    print(f"{args.model}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, device {jax.devices()[0].device_kind}",
          flush=True)
    print("| bucket | inputs | executables | call ms, device idle | call ms, back to back | "
          "device ms / step (back to back) |")
    print("|---:|---|---|---:|---:|---:|")
    p = runner.page_buckets[0]
    for t in buckets:
        compiled = runner._compile(t, p, VARIANTS[0])
        blob, in_tree, out_tree = serialize_executable.serialize(compiled)
        twin = serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
        host_args = runner._padding_arrays(t, p)
        dev_args = jax.device_put(host_args, runner._replicated)
        for label, a, fns in (("numpy", host_args, (compiled,)), ("on device", dev_args, (compiled,)),
                              ("numpy", host_args, (compiled, twin)), ("on device", dev_args, (compiled, twin))):
            kv, tp, sampled = runner.kv_cache, runner.token_pages, runner.prev_sampled
            for i in range(4):                                  # warm
                kv, tp, sampled, *_ = fns[i % len(fns)](runner.state, kv, tp, sampled, *a)
            sampled.block_until_ready()
            idle = []
            for i in range(args.steps):
                t0 = time.perf_counter()
                kv, tp, sampled, *_ = fns[i % len(fns)](runner.state, kv, tp, sampled, *a)
                idle.append(time.perf_counter() - t0)
                sampled.block_until_ready()
            b2b = []
            t_start = time.perf_counter()
            for i in range(args.steps):
                t0 = time.perf_counter()
                kv, tp, sampled, *_ = fns[i % len(fns)](runner.state, kv, tp, sampled, *a)
                b2b.append(time.perf_counter() - t0)
            sampled.block_until_ready()
            per_step = (time.perf_counter() - t_start) / args.steps
            runner.kv_cache, runner.token_pages, runner.prev_sampled = kv, tp, sampled
            print(f"| {t} | {label} | {'twins' if len(fns) > 1 else 'one'} | {statistics.median(idle) * 1e3:.3f} "
                  f"| {statistics.median(b2b[2:]) * 1e3:.3f} | {per_step * 1e3:.2f} |", flush=True)
    print(f"reproduce: XLA_FLAGS='{os.environ.get('XLA_FLAGS', '')}' python -m benchmarks.gpu.dispatch_probe "
          f"--model {args.model} --buckets {args.buckets} --steps {args.steps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
