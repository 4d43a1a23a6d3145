"""A/B of engine configurations on one offline dataset: each run in a fresh process, the configurations in turn.

Each run is ``python -m benchmarks.gpu.profile_run --windows none`` (the GPU suite's engine, 8B shape, random
weights, an offline dataset as ``jaxdyn bench offline`` runs it, no traces) with one configuration's
``EngineConfig`` fields over the suite's; the configurations alternate for ``--rounds`` rounds so that drift of
the machine falls on all of them alike. Set ``JAX_COMPILATION_CACHE_DIR`` so that only the first run of each
configuration compiles.

    python -m benchmarks.gpu.ab_offline --configs '[{}, {"xla_dot_merger": true}]' [--rounds 2]
        [--dataset sharegpt-lengths] [--num-prompts 1000]

A configuration's ``"env"`` object is set in its runs' environment instead (XLA's options for the whole
process, e.g. ``{"env": {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}}``: cuBLAS for every matrix
product); ``XLA_FLAGS`` is part of JAX's cache keys and the executable cache's fingerprint, so each such
configuration's first run compiles from scratch and its load seconds are a cold compilation's.

A configuration's ``"quant"`` (``"fp8"`` or ``"int8"``) quantizes the model (``profile_run --quant``), and
``"quantize_lm_head": true`` (with ``"quant": "fp8"``) its lm_head too (``profile_run --quantize-lm-head``).

A configuration's ``"temperature"``, ``"top_p"`` and ``"top_k"`` set every request's sampling (greedy by default):
``{"temperature": 1.0}`` runs the sampler's ``random`` variant every step, ``{"temperature": 1.0, "top_p": 0.9}``
its ``plain``.

A configuration's ``"tree"`` is a directory holding another copy of the repository (``git archive BASE | tar -x
-C base``): its runs run that code (``python -m`` from there), so two commits alternate in one call, e.g.
``--configs '[{"tree": "base"}, {}]'``. A tree runs its own suite engine (``benchmarks/gpu/gpu.py`` ``ENGINE``):
name the fields that differ between the two (``seq_buckets``, ``prefill_programs`` before session 38's) in both
configurations to compare the code alone.

prints a table: each configuration's runs (seconds, output tok/s), its median, its ratio to the first
configuration's median, its load-and-warm-up seconds and its step costs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

RUN = re.compile(r"the run ([\d.]+) s, (\d+) output tok/s; loaded and warmed up in ([\d.]+) s; "
                 r"step costs \(ms by token bucket\) (\{[^}]*\})")

SAMPLING = ("temperature", "top_p", "top_k")     # a configuration's requests' sampling (profile_run's flags)
COMPILED = re.compile(r"^compiled \d+ executables .*$", re.M)     # the warm-up's compilation (describe_compile)
FIRST_STEP = re.compile(r"its first step began [\d.]+ s after the run's start")   # profile_run's, where it prints it


def parse_run(text: str) -> tuple[float, float, float, str]:
    """(seconds, output tok/s, load s, step costs) of profile_run's header line; ValueError when absent."""
    m = RUN.search(text)
    if not m:
        raise ValueError("no run line in profile_run's output")
    return float(m.group(1)), float(m.group(2)), float(m.group(3)), m.group(4)


def split_config(cfg: dict, environ: dict[str, str]) -> tuple[dict, dict[str, str], str | None]:
    """(EngineConfig overrides, the run's environment, the tree its code comes from or None) of one
    configuration: ``environ`` with the configuration's ``"env"`` strings over it (ValueError when ``"env"``
    is not an object of strings, or ``"tree"`` not a directory with ``benchmarks/gpu/profile_run.py``)."""
    engine = {k: v for k, v in cfg.items() if k not in ("env", "tree", "quant", "quantize_lm_head", *SAMPLING)}
    if cfg.get("quantize_lm_head") not in (None, False, True) or (cfg.get("quantize_lm_head")
                                                                    and cfg.get("quant") != "fp8"):
        raise ValueError(f"\"quantize_lm_head\" of {json.dumps(cfg)}: true with \"quant\": \"fp8\" only")
    sampling = {k: cfg[k] for k in SAMPLING if k in cfg}
    if sampling:
        from serving.bench import BenchError
        from serving.bench.offline import check_sampling_arguments
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sampling.values()):
            raise ValueError(f"the sampling keys of {json.dumps(cfg)}: numbers expected")
        try:
            check_sampling_arguments(argparse.Namespace(**{"temperature": 0.0, "top_p": 1.0, "top_k": 0, **sampling}))
        except BenchError as e:
            raise ValueError(f"{json.dumps(cfg)}: {e}") from None
    env = cfg.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError(f"\"env\" of {json.dumps(cfg)}: expected an object of strings")
    tree = cfg.get("tree")
    if tree is not None:
        if not isinstance(tree, str) or not os.path.isfile(os.path.join(tree, "benchmarks", "gpu", "profile_run.py")):
            raise ValueError(f"\"tree\" of {json.dumps(cfg)}: not a copy of the repository")
        tree = os.path.abspath(tree)
    return engine, {**environ, **env}, tree


def run_command(cfg: dict, engine: dict, dataset: str, num_prompts: int, model: str) -> list[str]:
    """The ``profile_run`` command line of one run of configuration ``cfg`` (its EngineConfig fields ``engine``)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu.profile_run", "--windows", "none", "--dataset", dataset,
           "--num-prompts", str(num_prompts), "--model", model, "--engine", json.dumps(engine)]
    if "quant" in cfg:
        cmd += ["--quant", str(cfg["quant"])]
    if cfg.get("quantize_lm_head"):
        cmd.append("--quantize-lm-head")
    for key in SAMPLING:
        if key in cfg:
            cmd += ["--" + key.replace("_", "-"), str(cfg[key])]
    return cmd


def summarize(results: dict[int, list[tuple[float, float, float, str]]]) -> list[tuple[int, float, float]]:
    """[(config index, median tok/s, median / first config's median)] of the configurations that ran."""
    med = {i: statistics.median(r[1] for r in runs) for i, runs in results.items() if runs}
    base = med.get(0)
    return [(i, m, m / base if base else float("nan")) for i, m in sorted(med.items())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.ab_offline")
    ap.add_argument("--configs", required=True, help="JSON list of EngineConfig field overrides, one a configuration")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dataset", default="sharegpt-lengths")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--timeout-s", type=float, default=240.0, help="a run's limit")
    args = ap.parse_args(argv)
    try:
        configs = json.loads(args.configs)
        if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
            raise ValueError
    except ValueError:
        ap.error(f"--configs: expected a JSON list of objects, got {args.configs!r}")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    try:
        runs_of = [split_config(c, dict(os.environ)) for c in configs]
    except ValueError as e:
        ap.error(f"--configs: {e}")

    results: dict[int, list] = {i: [] for i in range(len(configs))}
    for r in range(args.rounds):
        for i, cfg in enumerate(configs):
            engine, env, tree = runs_of[i]
            cmd = run_command(cfg, engine, args.dataset, args.num_prompts, args.model)
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, env=env, cwd=tree)
                run = parse_run(p.stdout)
            except (subprocess.TimeoutExpired, ValueError) as e:
                tail = getattr(e, "stdout", None) or ""
                print(f"round {r} config {i} {cfg}: failed ({e.__class__.__name__})\n{str(tail)[-2000:]}", flush=True)
                if isinstance(e, ValueError):
                    print(p.stderr[-3000:], flush=True)
                continue
            results[i].append(run)
            compiled, first = COMPILED.search(p.stdout), FIRST_STEP.search(p.stdout)
            print(f"round {r} config {i} {cfg}: {run[0]:.2f} s, {run[1]:.0f} tok/s (load {run[2]:.1f} s) "
                  f"costs {run[3]}" + (f"; {first.group(0)}" if first else "")
                  + (f"\n  {compiled.group(0)}" if compiled else ""), flush=True)
    print(f"\n{args.dataset}, {args.num_prompts} prompts, {args.rounds} rounds, configurations in turn:\n")
    print("| config | runs: s (tok/s) | median tok/s | x config 0 | load s | step costs ms |\n|---|---|---:|---:|---:|---|")
    for i, m, ratio in summarize(results):
        runs = results[i]
        print(f"| `{json.dumps(configs[i])}` | " + ", ".join(f"{s:.2f} ({t:.0f})" for s, t, _, _ in runs)
              + f" | {m:.0f} | {ratio:.3f} | {', '.join(f'{x[2]:.0f}' for x in runs)} | {runs[-1][3]} |")
    print(f"\nreproduce: python -m benchmarks.gpu.ab_offline --configs '{args.configs}' --rounds {args.rounds} "
          f"--dataset {args.dataset} --num-prompts {args.num_prompts} --model {args.model}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
