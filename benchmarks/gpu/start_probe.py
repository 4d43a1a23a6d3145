"""Server start-up, cold and warm, for engine configurations: each ``jaxdyn serve`` of the GPU suite's engine
(8B shape, random weights) started with its own empty JAX compilation cache, timed from process start to
``/health`` 200, stopped, and started again on the now warm cache.

    python -m benchmarks.gpu.start_probe --configs '[{}, {"first_compiles_alone": false},
        {"env": {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}}]' [--model llama-3.1-8b] [--no-warm]

A configuration holds ``EngineConfig`` fields over the suite's engine (``benchmarks/gpu/gpu.py`` ``ENGINE``;
``--engine`` replaces fields of that base) and, under ``"env"``, the server's environment (``XLA_FLAGS``).
Each cold start is a first start: the configurations do not share a compilation cache, an executable cache
or XLA's autotuning results (a process's own). Prints a table: cold and warm seconds against the 60 s / 15 s
targets, the server's load and warm-up seconds, and the step costs it measured at warm-up (ms a step of
each token bucket: a configuration that compiles faster but picks slower kernels shows here), each bucket's
as a ratio to the first configuration's.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import tempfile

from benchmarks.gpu.ab_offline import split_config

COLD_TARGET_S, WARM_TARGET_S = 60.0, 15.0
LOAD = re.compile(r"jaxdyn: loaded .* in ([\d.]+) s, warm-up \([^)]*\) ([\d.]+) s")
COSTS = re.compile(r"jaxdyn: step costs \([^)]*\) (\{[^}]*\})")


def parse_start(lines: list[str]) -> dict:
    """The server's load and warm-up seconds and step costs (ms by token bucket; {} when not measured) from
    its log lines; ValueError when it never said it loaded."""
    text = "\n".join(lines)
    m = LOAD.search(text)
    if not m:
        raise ValueError("no load line in the server's log")
    c = COSTS.search(text)
    return {"load_s": float(m.group(1)), "warmup_s": float(m.group(2)),
            "costs": {int(k): float(v) for k, v in ast.literal_eval(c.group(1)).items()} if c else {}}


def start_once(argv: list[str], env: dict, log_path: str, url: str, timeout_s: float) -> dict:
    """One start to ready and stop: ready seconds (None and why when it was not), parsed log."""
    from benchmarks.gpu.suite import Server
    server = Server(argv, env, log_path, url)
    try:
        ready, why = server.start(timeout_s)
        out = {"ready_s": ready, "why": why}
        if ready is not None:
            out.update(parse_start(server.tail(400)))
        else:
            out["tail"] = server.tail(30)
        return out
    finally:
        rc = server.stop()
        if rc not in (0, None):
            print(f"  (the server exited with status {rc})", flush=True)


def main(argv=None) -> int:
    from benchmarks.gpu.gpu import ENGINE, SERVER_ENV, engine_with
    from benchmarks.gpu.suite import _free_port, model_dir, serve_flags

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.start_probe")
    ap.add_argument("--configs", default="[{}]", help="JSON list of configurations (EngineConfig fields, \"env\")")
    ap.add_argument("--model", default="llama-3.1-8b", help="a preset (random weights, word-level tokenizer)")
    ap.add_argument("--engine", default="{}", help="JSON object replacing fields of the suite's engine")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--no-warm", dest="warm", action="store_false", help="cold starts only")
    ap.add_argument("--timeout-s", type=float, default=170.0, help="a start's limit")
    ap.add_argument("--scratch", default=None, help="directory for the model and caches (default: a new one)")
    args = ap.parse_args(argv)
    try:
        configs = json.loads(args.configs)
        overrides = json.loads(args.engine)
        if not isinstance(overrides, dict):
            raise ValueError("--engine: expected a JSON object")
        base = engine_with(ENGINE, overrides)
        if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
            raise ValueError("--configs: expected a JSON list of objects")
        runs = []
        for c in configs:
            if "tree" in c or "quant" in c:
                raise ValueError(f"--configs: {json.dumps(c)}: \"tree\" and \"quant\" are ab_offline's, not this probe's")
            engine, env, _ = split_config(c, dict(os.environ))
            runs.append((engine_with(ENGINE, {**overrides, **engine}), env))
    except ValueError as e:
        ap.error(str(e))
    scratch = args.scratch or tempfile.mkdtemp(prefix="jaxdyn-start-")
    path = model_dir(args.model, scratch)
    results = []
    for i, (e, env) in enumerate(runs):
        port = _free_port()
        flags, buckets = serve_flags(path, args.model, e, args.dtype, port)
        cmd = [sys.executable, "-m", "serving.cli", "serve", *flags, *buckets]
        cache = os.path.join(scratch, f"jax_cache_{i}")
        os.makedirs(cache, exist_ok=True)
        run_env = {**SERVER_ENV, **env, "JAX_COMPILATION_CACHE_DIR": cache,
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        run_env.pop("JAXDYN_EXECUTABLE_CACHE", None)          # inside this configuration's JAX cache
        starts = {}
        for kind in ("cold", "warm") if args.warm else ("cold",):
            r = start_once(cmd, run_env, os.path.join(scratch, f"serve_{i}_{kind}.log"),
                           f"http://127.0.0.1:{port}", args.timeout_s)
            starts[kind] = r
            print(f"config {i} {json.dumps(configs[i])} {kind}: "
                  + (f"ready in {r['ready_s']:.1f} s (load {r['load_s']:.1f} s, warm-up {r['warmup_s']:.1f} s) "
                     f"step costs {r['costs']}" if r["ready_s"] is not None
                     else f"not ready: {r['why']}\n" + "\n".join(r["tail"])), flush=True)
        results.append(starts)
    print(f"\n{args.model}, engine {base}; each configuration its own empty caches, then warm:\n")
    print(table(configs, results))
    print(f"\nreproduce: python -m benchmarks.gpu.start_probe --configs '{args.configs}' --model {args.model}"
          + (f" --engine '{args.engine}'" if args.engine != "{}" else "") + ("" if args.warm else " --no-warm"))
    return 0 if all(s["ready_s"] is not None for r in results for s in r.values()) else 1


def table(configs: list[dict], results: list[dict]) -> str:
    """Markdown: per configuration, cold / warm seconds (x their targets), load and warm-up seconds, step
    costs (x the first configuration's, bucket by bucket)."""
    rows = ["| config | cold s (x 60 s) | load / warm-up s | warm s (x 15 s) | step costs ms (x config 0) |",
            "|---|---:|---:|---:|---|"]
    base = results[0].get("cold", {}).get("costs", {}) if results else {}

    def fmt(r: dict | None, target: float) -> str:
        if not r or r["ready_s"] is None:
            return "not ready" if r else "-"
        return f"{r['ready_s']:.1f} ({r['ready_s'] / target:.2f}x)"

    for cfg, res in zip(configs, results):
        cold, warm = res.get("cold"), res.get("warm")
        costs = (cold or {}).get("costs", {})
        cost_text = ", ".join(f"{t}: {ms:.2f}" + (f" ({ms / base[t]:.3f}x)" if base.get(t) else "")
                              for t, ms in sorted(costs.items())) or "-"
        lw = f"{cold['load_s']:.1f} / {cold['warmup_s']:.1f}" if cold and cold["ready_s"] is not None else "-"
        rows.append(f"| `{json.dumps(cfg)}` | {fmt(cold, COLD_TARGET_S)} | {lw} | {fmt(warm, WARM_TARGET_S)} "
                    f"| {cost_text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
