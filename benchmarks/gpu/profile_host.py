"""Where the engine loop's host time goes in an offline run: cProfile over ``LLM.generate`` on the GPU suite's
engine (the 8B shape, random weights), one dataset after another.

    python -m benchmarks.gpu.profile_host [--datasets prefix,sharegpt-lengths] [--num-prompts 1000]
        [--model llama-3.1-8b] [--top 30] [--out DIR] [--engine JSON] [--quant fp8]
        [--call-times] [--part-options KIND=JSON ...]

prints, for each dataset, the run's seconds, steps, the loop's host and device-wait ms a step (as the suite's
tables), the same run's seconds without the profiler (run first), and the functions with the most own time
and the most cumulative time; ``--out`` also writes each profile (``pstats`` files).

``--call-times`` adds a third run, without cProfile, that times each compiled call on the host (the Python call
of the executable: argument handling, host-to-device copies of the step's buffers, the launch) by part (a whole
"step", a "switch" for the variants ``sampler_switch`` switches -- on a GPU by default plain's and full's --, or a
"forward" and a "sample" where ``separate_sampler`` splits it) and token bucket. ``--part-options
sample={"xla_gpu_graph_min_graph_size": 100000}`` compiles the parts of one kind with more XLA options (here: the
sampler's calls without CUDA graphs), to find which part's launch costs the host.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time

from benchmarks.gpu import suite


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.profile_host")
    ap.add_argument("--datasets", default="prefix,sharegpt-lengths")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--engine", default=None, help="JSON of EngineConfig fields over the GPU suite's ENGINE")
    suite.add_quant_arguments(ap)
    ap.add_argument("--call-times", action="store_true", help="time each compiled call by part and bucket")
    ap.add_argument("--part-options", action="append", default=[], metavar="KIND=JSON",
                    help="more XLA compiler options for the parts of one kind (step, forward, sample)")
    args = ap.parse_args(argv)
    suite.check_quant_arguments(ap, args)

    import json

    from benchmarks.gpu.gpu import ENGINE, engine_with, offline_datasets
    from benchmarks.gpu.suite import _dataset_args, _engine_config, model_dir, quant_overrides
    from jaxdyn import LLM
    from jaxdyn.engine.llm import build_engine
    from serving.bench import datasets, offline

    if args.part_options:
        _patch_part_options(dict(_kind_options(o) for o in args.part_options))
    engine_cfg = engine_with(ENGINE, json.loads(args.engine) if args.engine else {})
    path = model_dir(args.model, tempfile.mkdtemp(), **quant_overrides(vars(args)))
    t0 = time.perf_counter()
    engine = build_engine(path, load_format="dummy", dtype=args.dtype, config=_engine_config(engine_cfg))
    print(f"engine {engine_cfg}: loaded and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
    llm = LLM(engine=engine)
    by_name = {}
    for d in offline_datasets(False, args.num_prompts):      # the first of a name (sharegpt-lengths: chatgpt)
        by_name.setdefault(d["dataset"], d)
    m = engine.metrics
    for name in args.datasets.split(","):
        ds = by_name[name]
        a = _dataset_args(ds)
        source = datasets.PromptSource(datasets.seeded_rng(0, 1, 0), llm.tokenizer, None)
        samples = datasets.load_samples(a, source)
        llm.reset_prefix_cache()        # each run computes its prompts: the runs compare
        plain = offline.benchmark(llm, samples, num_warmups=ds.get("num_warmups", 0), progress=False)
        prof = cProfile.Profile()
        llm.reset_prefix_cache()
        s0, h0, w0 = m.steps, m.host_seconds, m.device_wait_seconds
        t = time.perf_counter()
        prof.enable()
        s = offline.benchmark(llm, samples, num_warmups=0, progress=False)
        prof.disable()
        wall = time.perf_counter() - t
        steps = m.steps - s0
        print(f"\n## {name}: {len(samples)} prompts, {plain['duration_s']:.2f} s unprofiled "
              f"({plain['output_throughput']:.0f} output tok/s); profiled {s['duration_s']:.2f} s, {steps} steps, "
              f"host {(m.host_seconds - h0) / steps * 1e3:.2f} ms / step, wait "
              f"{(m.device_wait_seconds - w0) / steps * 1e3:.2f} ms / step, wall {wall:.1f} s", flush=True)
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.top)
            print(buf.getvalue(), flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            prof.dump_stats(os.path.join(args.out, f"{name}.pstats"))
        if args.call_times:
            times, types = {}, {}
            undo = _time_calls(engine.runner, times, types)
            llm.reset_prefix_cache()
            s0, h0 = m.steps, m.host_seconds
            s = offline.benchmark(llm, samples, num_warmups=0, progress=False)
            undo()
            steps = m.steps - s0
            print(f"outputs' types by part: {types}", flush=True)
            print(f"### {name}, calls timed: {s['duration_s']:.2f} s ({s['output_throughput']:.0f} output tok/s), "
                  f"{steps} steps, host {(m.host_seconds - h0) / steps * 1e3:.2f} ms / step\n\n"
                  "| part | tokens | calls | host ms / call | total s | slow-path calls |\n|---|---:|---:|---:|---:|---:|", flush=True)
            for (kind, t), (n, sec, k) in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                print(f"| {kind} | {t} | {n} | {sec / n * 1e3:.3f} | {sec:.2f} | {k} |")
            print(flush=True)
    return 0


def _kind_options(spec: str) -> tuple[str, dict]:
    import json
    kind, _, opts = spec.partition("=")
    if kind not in ("step", "switch", "forward", "sample") or not opts:
        raise SystemExit(f"--part-options {spec!r}: expected KIND=JSON with KIND step, switch, forward or sample")
    return kind, json.loads(opts)


def _patch_part_options(by_kind: dict) -> None:
    """Compile the parts of each kind in ``by_kind`` with its extra XLA options (on top of the runner's own)."""
    from jaxdyn.engine.runner import ModelRunner
    lower_part = ModelRunner._lower_part

    def _lower(self, key):
        self._profiled_kind = key[0]
        return lower_part(self, key)

    def _compile(self, lowered, tokens):
        extra = by_kind.get(getattr(self, "_profiled_kind", "step"), {})
        return lowered.compile(compiler_options={**self.compiler_options(tokens), **extra})

    ModelRunner._lower_part, ModelRunner.compile = _lower, _compile


def _time_calls(runner, times: dict, types: dict | None = None):
    """Wrap every compiled step of ``runner`` (and both calls of a split one) so that each call adds its host
    seconds to ``times[(part, tokens)]`` (calls, seconds, calls through JAX's Python path), and ``types[part]``
    gets the types of the part's outputs (JAX's C++ fast path wants jax Arrays only); returns a function that
    unwraps them."""
    import jax
    from jax._src import util as jax_util

    from jaxdyn.engine.runner import _SplitStep
    types = {} if types is None else types
    slow = [0]          # calls JAX ran through its Python path (``Compiled.call``), not its C++ fast path

    def listen(name, *_):
        if name == "stages_compiled_call":
            slow[0] += 1

    def timed(fn, kind, t):
        def call(*a):
            s0 = slow[0]
            t0 = time.perf_counter()
            out = fn(*a)
            n, sec, k = times.get((kind, t), (0, 0.0, 0))
            times[(kind, t)] = (n + 1, sec + time.perf_counter() - t0, k + slow[0] - s0)
            types.setdefault(kind, sorted({type(x).__name__ for x in jax.tree.leaves(out)}))
            return out
        return call

    saved = dict(runner._compiled)
    for key, step in saved.items():
        # (t, p, variant), or (t, p, variant, s) for fewer sequence slots (``seq_buckets``): timed apart, as "t/s"
        t, variant = key[0] if len(key) == 3 else f"{key[0]}/{key[3]}", key[2]
        if isinstance(step, _SplitStep):
            # each call, and the whole step as one executable's is timed (its inputs' transfer and both calls)
            runner._compiled[key] = timed(_SplitStep(timed(step.forward, "forward", t),
                                                     timed(step.sample, "sample", t), step.sharding), "step", t)
        else:       # a switched variant's step is its bucket's switch (``sampler_switch``: on a GPU, plain's and full's)
            runner._compiled[key] = timed(step, "switch" if variant in runner._switch else "step", t)
    listener, jax_util.test_event_listener = jax_util.test_event_listener, listen

    def undo():
        runner._compiled.update(saved)
        jax_util.test_event_listener = listener
    return undo


if __name__ == "__main__":
    raise SystemExit(main())
