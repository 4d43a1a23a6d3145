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

    python -m benchmarks.gpu.dispatch_probe [--model llama-3.1-8b] [--buckets 16,512] [--steps 20] [--quant fp8]
        [--runner '{"sampler_switch": true, "kv_cache_dtype": "fp8"}']

``--runner`` sets ``RunnerConfig`` fields over the probe's. The probe times greedy's step: with ``sampler_switch``
true that is the switch's one executable (greedy branch); with "plain_full" (a GPU's default) greedy's step is its own
executable, as with false. The switch's ``lax.switch`` XLA records into the step's CUDA graph as conditional nodes; when
a buffer one of its branches uses moved, XLA re-records every branch, so a switch step's call may take longer than
the tree's where buffers move each call (what this probe shows side by side).

Run it under different ``XLA_FLAGS`` (e.g. ``--xla_gpu_enable_command_buffer=``) to compare; the flags in effect
are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def runner_overrides(ap: argparse.ArgumentParser, text: str) -> dict:
    """``--runner``'s JSON object of RunnerConfig fields (the parser's error naming what is wrong)."""
    import dataclasses
    import json

    from jaxdyn.engine.runner import RunnerConfig

    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        ap.error(f"--runner: not JSON ({e})")
    if not isinstance(overrides, dict):
        ap.error("--runner: expected a JSON object of RunnerConfig fields")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(RunnerConfig)})
    if unknown:
        ap.error(f"--runner: not RunnerConfig fields: {', '.join(unknown)}")
    return overrides


def probe_config(buckets: tuple[int, ...], overrides: dict):
    """The probe's RunnerConfig: one page bucket of 128 pages, the token buckets asked, ``overrides`` over it."""
    from jaxdyn.engine.runner import RunnerConfig

    return RunnerConfig(**{**dict(page_size=16, num_pages=8192, max_num_seqs=max(buckets),
                                  max_num_batched_tokens=max(buckets), max_model_len=2048, token_buckets=buckets,
                                  page_buckets=(128,)), **overrides})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.dispatch_probe")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--buckets", default="16,512")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quant", default=None, choices=("fp8", "int8"), help="the layers' weights quantized")
    ap.add_argument("--runner", default="{}", help="JSON of RunnerConfig fields over the probe's")
    args = ap.parse_args(argv)
    try:
        buckets = tuple(int(b) for b in args.buckets.split(","))
    except ValueError:
        ap.error(f"--buckets: expected token counts separated by commas, got {args.buckets!r}")
    overrides = runner_overrides(ap, args.runner)

    import jax
    from jax.experimental import serialize_executable

    from checkpoints.loader import load_model
    from jaxdyn.engine.runner import ModelRunner
    from jaxdyn.engine.sampler import VARIANTS
    from jaxdyn.engine.xla_options import command_buffer_update_mode, gpu_memory_fraction

    command_buffer_update_mode()      # the engine's XLA options (build_engine's), before the backend starts
    gpu_memory_fraction(None)
    mesh, loaded, _ = load_model(args.model, load_format="dummy", dtype="bfloat16", quantization=args.quant)
    runner = ModelRunner(loaded.graphdef, loaded.state, mesh, probe_config(buckets, overrides))
    print(f"{args.model}, quant {args.quant}, runner {overrides}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"device {jax.devices()[0].device_kind}", flush=True)
    print("| bucket | inputs | executables | call ms, device idle | call ms, back to back | "
          "device ms / step (back to back) |")
    print("|---:|---|---|---:|---:|---:|")
    p = runner.page_buckets[0]
    for t in buckets:
        compiled = runner._compile(t, p, VARIANTS[0])
        blob, in_tree, out_tree = serialize_executable.serialize(compiled)
        twin = serialize_executable.deserialize_and_load(blob, in_tree, out_tree,
                                                         execution_devices=list(mesh.devices.flat))
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
          f"--model {args.model} --buckets {args.buckets} --steps {args.steps}"
          + (f" --quant {args.quant}" if args.quant else "") + (f" --runner '{args.runner}'" if overrides else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
