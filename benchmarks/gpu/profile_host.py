"""Where the engine loop's host time goes in an offline run: cProfile over ``LLM.generate`` on the GPU suite's
engine (the 8B shape, random weights), one dataset after another.

    python -m benchmarks.gpu.profile_host [--datasets prefix,sharegpt-lengths] [--num-prompts 1000]
        [--model llama-3.1-8b] [--top 30] [--out DIR] [--engine JSON] [--quant fp8]

prints, for each dataset, the run's seconds, steps, the loop's host and device-wait ms a step (as the suite's
tables), the same run's seconds without the profiler (run first), and the functions with the most own time
and the most cumulative time; ``--out`` also writes each profile (``pstats`` files).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.profile_host")
    ap.add_argument("--datasets", default="prefix,sharegpt-lengths")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--engine", default=None, help="JSON of EngineConfig fields over the GPU suite's ENGINE")
    from jaxdyn.config import QUANTIZATIONS        # no JAX
    ap.add_argument("--quant", default=None, choices=QUANTIZATIONS,
                    help="the model quantized (random weights as jaxdyn convert --quant lays them out)")
    args = ap.parse_args(argv)

    import json

    from benchmarks.gpu.gpu import ENGINE, offline_datasets
    from benchmarks.gpu.suite import _dataset_args, _engine_config, model_dir
    from jaxdyn import LLM
    from jaxdyn.engine.llm import build_engine
    from serving.bench import datasets, offline

    engine_cfg = dict(ENGINE, **(json.loads(args.engine) if args.engine else {}))
    path = model_dir(args.model, tempfile.mkdtemp(),
                     **({"jaxdyn_quantization": args.quant} if args.quant else {}))
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
        plain = offline.benchmark(llm, samples, num_warmups=ds.get("num_warmups", 0), progress=False)
        prof = cProfile.Profile()
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
