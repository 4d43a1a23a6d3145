"""Where an offline run's device time goes, phase by phase: JAX profiler traces of windows of engine steps.

The GPU suite's engine (8B shape, random weights) runs an offline dataset as ``jaxdyn bench offline`` does; for
each window of engine steps (counted from the timed run's first step) a JAX profiler trace is taken, and its
GPU kernels are summed by kind (matrix products, decode attention, prefill attention, KV writes, the rest) and
set beside what the window's steps asked for:

- matrix products: their floor is, per call, the larger of (weights read at the copy bandwidth) and (2 x matmul
  parameters x the call's bucket rows + the LM head's rows, at the bf16 matmul rate), both measured in this
  process;
- decode attention: the decode rows' KV bytes at the copy bandwidth;
- idle: the window's GPU span less the time some kernel ran (the host not keeping the device fed).

    python -m benchmarks.gpu.profile_run [--dataset sharegpt-lengths] [--num-prompts 1000]
        [--windows 10:40,100:130,250:280,500:530,900:930] [--model llama-3.1-8b] [--engine JSON] [--out DIR]

prints one table (a row per window, ms a step) and the run's own figures. The traces perturb the run (stopping
one writes it), so the run's seconds are not a throughput figure; the windows' device times are.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import tempfile
import time

from benchmarks.gpu import suite
from serving.bench import BenchError
from serving.bench.offline import add_sampling_arguments, check_sampling_arguments

KINDS = (("gemm", re.compile(r"gemm|nvjet|cublas|cutlass|xmma|matmul|dot", re.I)),
         ("decode attn", re.compile(r"paged_decode|merge_decode_splits", re.I)),
         ("prefill attn", re.compile(r"ragged_prefill", re.I)),
         # XLA's K/V scatters, or the rope kernel that rotates q and k and writes K/V (``fused_rope_kv``)
         ("kv write", re.compile(r"scatter|rope_write_kv", re.I)))


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if pat.search(name):
            return kind
    return "other"


def busy_union(events) -> float:
    """µs during which at least one kernel ran (events: (start µs, duration µs, name) in start order)."""
    total, end = 0.0, None
    start = None
    for ts, dur, _ in events:
        if end is None or ts > end:
            if end is not None:
                total += end - start
            start, end = ts, ts + dur
        else:
            end = max(end, ts + dur)
    if end is not None:
        total += end - start
    return total


def summarize_window(events, calls: list[dict], *, weight_bytes: int, matmul_params: int, head_params: int,
                     kv_bytes_per_token: int, bandwidth: float, matmul: float) -> dict:
    """One window's figures, ms per engine step (``calls``: the runner calls of its steps)."""
    steps = len({c["step"] for c in calls}) or 1
    by_kind: dict[str, float] = collections.defaultdict(float)
    for _, dur, name in events:
        by_kind[kind_of(name)] += dur
    span = (max(ts + d for ts, d, _ in events) - events[0][0]) if events else 0.0
    busy = busy_union(events)
    gemm_floor = sum(max(weight_bytes / bandwidth,
                         2.0 * (matmul_params * c["rows"] + head_params * c["seqs"]) / matmul) for c in calls)
    kv_floor = sum(c["decode_kv"] for c in calls) * kv_bytes_per_token / bandwidth
    ms = lambda us: us / 1e3 / steps  # noqa: E731
    return {
        "steps": steps, "calls": len(calls),
        "tokens": sum(c["tokens"] for c in calls) / steps, "rows": sum(c["rows"] for c in calls) / steps,
        "decode rows": sum(c["decode"] for c in calls) / steps,
        "decode ctx": sum(c["decode_kv"] for c in calls) / max(1, sum(c["decode"] for c in calls)),
        "span ms": ms(span), "idle ms": ms(span - busy),
        **{f"{k} ms": ms(by_kind.get(k, 0.0)) for k, _ in KINDS}, "other ms": ms(by_kind.get("other", 0.0)),
        "gemm floor ms": gemm_floor * 1e3 / steps, "decode attn floor ms": kv_floor * 1e3 / steps,
    }


def top_kernels(events, steps: int, n: int = 8, kinds=("other", "kv write")) -> list[tuple[str, str, float, float]]:
    """[(kind, kernel name, ms per step, launches per step)] of the ``n`` kernels of ``kinds`` that took the
    most time in a window of ``steps`` engine steps, most first."""
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for _, dur, name in events:
        if kind_of(name) in kinds:
            total[name] += dur
            count[name] += 1
    top = sorted(total, key=total.get, reverse=True)[:n]
    return [(kind_of(k), k, total[k] / 1e3 / steps, count[k] / steps) for k in top]


RUNNING_EDGES = (0, 16, 64, 128, 256, 512, 768, 1025)


def _bins(loop, edges):
    """(low, high, the steps of ``loop`` whose running sequences (their first field) fall in [low, high)) of
    each non-empty bin."""
    for lo, hi in zip(edges, edges[1:]):
        sel = [x for x in loop if lo <= x[0] < hi]
        if sel:
            yield lo, hi, sel


def loop_by_running(loop, edges=RUNNING_EDGES):
    """[(low, high, steps, host ms / step, wait ms / step, share of steps with under 50 µs of wait, call ms / step)]
    of the engine steps ``loop`` ((running sequences, host s, wait s, tokens, prefill tokens, call s) each) binned
    by running sequences; call: the part of host spent inside the compiled steps' calls."""
    return [(lo, hi, len(sel), sum(x[1] for x in sel) / len(sel) * 1e3, sum(x[2] for x in sel) / len(sel) * 1e3,
             sum(x[2] < 50e-6 for x in sel) / len(sel), sum(x[5] for x in sel) / len(sel) * 1e3)
            for lo, hi, sel in _bins(loop, edges)]


def decode_steps_by_running(loop, costs: dict[int, float], edges=RUNNING_EDGES):
    """[(low, high, steps, host ms / step, wait ms / step, share of steps with under 0.5 ms of wait, mean step
    cost ms of their buckets, call ms / step)] of the decode-only steps of ``loop`` ((running sequences, host s,
    wait s, step tokens, prefill tokens, call s) each) binned by running sequences; ``costs``: ms by token bucket.
    A step whose host time outside its calls exceeds its bucket's cost leaves the device idle (overlap hides the
    host only up to the device's time): the engine is host-bound there. Time inside the calls is not all host
    work: a call that returns only once the device has finished the previous step waits in it."""
    buckets = sorted(costs)
    decode = [x for x in loop if x[4] == 0 and x[3] > 0]
    out = []
    for lo, hi, sel in _bins(decode, edges):
        cost = [costs[next((b for b in buckets if b >= x[3]), buckets[-1])] for x in sel] if buckets else [0.0]
        out.append((lo, hi, len(sel), sum(x[1] for x in sel) / len(sel) * 1e3,
                    sum(x[2] for x in sel) / len(sel) * 1e3, sum(x[2] < 0.5e-3 for x in sel) / len(sel),
                    sum(cost) / len(cost), sum(x[5] for x in sel) / len(sel) * 1e3))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.profile_run")
    ap.add_argument("--dataset", default="sharegpt-lengths")
    ap.add_argument("--num-prompts", type=int, default=1000)
    add_sampling_arguments(ap)                 # every request's sampling (default greedy)
    ap.add_argument("--windows", default="10:40,100:130,250:280,500:530,900:930",
                    help="engine-step ranges START:END of the timed run, comma-separated (none: no traces)")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--engine", default=None, help="JSON of EngineConfig fields over the GPU suite's ENGINE")
    suite.add_quant_arguments(ap)
    ap.add_argument("--out", default=None, help="write the table here (profile_run.md)")
    ap.add_argument("--keep-traces", action="store_true", help="keep the traces in --out too")
    ap.add_argument("--hlo", nargs="?", const="largest", default=None, metavar="BUCKETS",
                    help="write optimized HLO in --out too: the largest bucket's, or of each token bucket listed "
                         "(comma-separated)")
    ap.add_argument("--host-top", type=int, default=15,
                    help="list the N host events (XLA / PJRT annotations of dispatch) with the most time a step")
    ap.add_argument("--bandwidth-gib", type=float, default=4.0, help="size of the copy-bandwidth measurement")
    ap.add_argument("--matmul-n", type=int, default=8192, help="size of the matmul-rate measurement")
    args = ap.parse_args(argv)
    suite.check_quant_arguments(ap, args)
    try:
        check_sampling_arguments(args)
    except BenchError as e:
        ap.error(str(e))
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    try:
        windows = ([] if args.windows == "none" else
                   [tuple(int(x) for x in w.split(":")) for w in args.windows.split(",")])
        if any(len(w) != 2 or w[0] >= w[1] or w[0] < 0 for w in windows):
            raise ValueError
    except ValueError:
        ap.error(f"--windows: expected START:END pairs with START < END, got {args.windows!r}")
    windows.sort()

    import jax

    from benchmarks.gpu.gpu import ENGINE, engine_with, offline_datasets
    from benchmarks.gpu.profile_step import host_events, kernel_events
    from benchmarks.gpu.suite import _dataset_args, _engine_config, layers_matmul_params, model_dir, quant_overrides
    from benchmarks.kernels import measure_bandwidth, measure_matmul
    from jaxdyn import LLM
    from jaxdyn.engine.llm import build_engine, describe_compile
    from serving.bench import datasets, offline

    engine_cfg = engine_with(ENGINE, json.loads(args.engine) if args.engine else {})
    hlo_buckets = []                          # checked before the model loads
    if args.hlo == "largest":
        hlo_buckets = [max(engine_cfg["token_buckets"])]
    elif args.hlo is not None:
        try:
            hlo_buckets = [int(b) for b in args.hlo.split(",")]
        except ValueError:
            ap.error(f"--hlo: expected token buckets separated by commas, got {args.hlo!r}")
        if missing := [b for b in hlo_buckets if b not in engine_cfg["token_buckets"]]:
            ap.error(f"--hlo: {missing} not among the token buckets {engine_cfg['token_buckets']}")
    scratch = args.out if args.out and args.keep_traces else tempfile.mkdtemp()
    path = model_dir(args.model, tempfile.mkdtemp(), **quant_overrides(vars(args)))
    # measured before the engine, their buffers freed before its KV pages take the device (after it, 4 GiB did
    # not fit beside 20,480 bf16 pages on an H100), under the XLA options build_engine sets before JAX starts
    from jaxdyn.engine.xla_options import command_buffer_update_mode, gpu_memory_fraction
    config = _engine_config(engine_cfg)          # checked before its memory share is set
    command_buffer_update_mode()
    gpu_memory_fraction(config.gpu_memory_utilization)
    bandwidth, matmul = measure_bandwidth(args.bandwidth_gib), measure_matmul(args.matmul_n)
    t0 = time.perf_counter()
    engine = build_engine(path, load_format="dummy", config=config)
    load_s = time.perf_counter() - t0
    costs = {b: round(c * 1e3, 2) for b, c in (engine.runner.step_costs or {}).items()}
    print(f"engine {engine_cfg}: loaded and warmed up in {load_s:.1f} s; step costs (ms by token bucket) {costs}",
          flush=True)
    if "compile" in engine.load_info:
        print(describe_compile(engine.load_info["compile"]), flush=True)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul / 1e12:.0f} TFLOP/s", flush=True)

    mc = engine.model_config
    runner = engine.runner
    if args.out and hlo_buckets:
        from jaxdyn.engine.sampler import VARIANTS
        os.makedirs(args.out, exist_ok=True)
        for t in hlo_buckets:
            with open(os.path.join(args.out, f"step_{t}.hlo.txt"), "w") as f:
                f.write(runner._compile(t, runner.page_buckets[0], VARIANTS[0]).as_text())
    itemsize = 2
    matmul_params = layers_matmul_params(mc)
    head_params = mc.hidden_size * mc.vocab_size
    # fp8 / int8 layers read 1 byte a weight (the head 16-bit unless --quantize-lm-head); the pages' own dtype for
    # the KV
    weight_bytes = matmul_params * (1 if args.quant else itemsize) + head_params * (1 if args.quantize_lm_head
                                                                                   else itemsize)
    kv_bytes_per_token = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * runner.kv_cache[0][0].dtype.itemsize

    state = {"step": -1, "calls": [], "window": None, "done": []}
    execute = runner.execute

    def traced_execute(work, variant=None, **kw):
        calls0, rows0 = runner.calls_run, runner.rows_run
        handle = execute(work, variant, **kw)
        s = state["step"] - 1
        if state["window"] is not None:
            decode = [w for w in work if len(w.token_ids) == 1]
            state["calls"].append(dict(
                step=s, tokens=sum(len(w.token_ids) for w in work), rows=runner.rows_run - rows0,
                seqs=len(work), ncalls=runner.calls_run - calls0, decode=len(decode),
                decode_kv=sum(w.num_computed + 1 for w in decode)))
            # one record a call: spread the step's rows over its calls for the floor (rows are per bucket)
            n = state["calls"][-1]["ncalls"]
            if n > 1:
                rec = state["calls"].pop()
                for _ in range(n):
                    state["calls"].append(dict(rec, rows=rec["rows"] / n, seqs=rec["seqs"] / n,
                                               tokens=rec["tokens"] / n, decode=rec["decode"] / n,
                                               decode_kv=rec["decode_kv"] / n))
        return handle

    runner.execute = traced_execute
    step = engine.step

    def drain():
        for leaf in jax.tree.leaves(runner.kv_cache):
            leaf.block_until_ready()

    metrics = engine.metrics
    loop = []       # every timed step: (running sequences before it, host s, device-wait s, tokens, prefill tokens, call s)

    def traced_step(*a, **k):
        if state["step"] < 0:           # warm-up requests: not counted
            return step(*a, **k)
        if state["step"] == 0:          # the run's first step: what queueing its requests took before it
            state["first_step_s"] = time.perf_counter() - state["started"]
        n, h0, w0 = len(engine.scheduler.running), metrics.host_seconds, metrics.device_wait_seconds
        t0, p0, c0 = runner.tokens_run, metrics.computed_prefill_tokens, runner.call_seconds
        try:
            return windowed_step(*a, **k)
        finally:
            loop.append((n, metrics.host_seconds - h0, metrics.device_wait_seconds - w0, runner.tokens_run - t0,
                         metrics.computed_prefill_tokens - p0, runner.call_seconds - c0))

    def windowed_step(*a, **k):
        s = state["step"]
        state["step"] += 1
        w = state["window"]
        if w is not None and s >= w[1]:
            drain()
            jax.profiler.stop_trace()
            state["done"].append((w, state["trace"], state["calls"]))
            state["window"], state["calls"] = None, []
        if state["window"] is None:
            pending = [x for x in windows if x[0] == s]
            if pending:
                d = os.path.join(scratch, f"trace_{pending[0][0]}_{pending[0][1]}")
                drain()                 # the window's trace holds its own steps' kernels only
                jax.profiler.start_trace(d)
                state["window"], state["trace"] = pending[0], d
        return step(*a, **k)

    engine.step = traced_step
    llm = LLM(engine=engine)
    ds = next(d for d in offline_datasets(False, args.num_prompts) if d["dataset"] == args.dataset)
    a = _dataset_args(ds)
    source = datasets.PromptSource(datasets.seeded_rng(0, 1, 0), llm.tokenizer, None)
    samples = datasets.load_samples(a, source)

    def on_start():
        state["step"] = 0
        state["started"] = time.perf_counter()

    summary = offline.benchmark(llm, samples, num_warmups=ds.get("num_warmups", 0), progress=False,
                                on_start=on_start, **sampling)
    if state["window"] is not None:
        jax.profiler.stop_trace()
        state["done"].append((state["window"], state["trace"], state["calls"]))
    print(f"run: {state['step']} steps, {summary['duration_s']:.1f} s, "
          f"{summary['output_throughput']:.0f} output tok/s" + (" (perturbed by the traces)" if windows else "")
          + f"; its first step began {state.get('first_step_s', float('nan')):.3f} s after the run's start (the "
            "requests tokenized and queued)", flush=True)

    rows, tops, gemms, hosts = [], [], [], []
    for w, trace_dir, calls in state["done"]:
        events = kernel_events(trace_dir)
        if not calls:
            continue
        if args.host_top:
            nsteps = len({c["step"] for c in calls}) or 1
            top = sorted(host_events(trace_dir).items(), key=lambda kv: -kv[1][1])[:args.host_top]
            hosts.append((f"{w[0]}-{w[1]}", [(name, us / 1e3 / nsteps, n / nsteps) for name, (n, us) in top]))
        r = summarize_window(events, calls, weight_bytes=weight_bytes, matmul_params=matmul_params,
                             head_params=head_params, kv_bytes_per_token=kv_bytes_per_token,
                             bandwidth=bandwidth, matmul=matmul)
        rows.append((f"{w[0]}-{w[1]}", r))
        tops.append((f"{w[0]}-{w[1]}", top_kernels(events, r["steps"])))
        gemms.append((f"{w[0]}-{w[1]}", r["rows"], top_kernels(events, r["steps"], n=12, kinds=("gemm",))))
    keys = list(rows[0][1]) if rows else []
    lines = [f"{args.dataset}, {args.num_prompts} prompts, engine {engine_cfg}; copy bandwidth "
             f"{bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul / 1e12:.0f} TFLOP/s (this process); the run "
             f"{summary['duration_s']:.1f} s, {summary['output_throughput']:.0f} output tok/s; loaded and warmed up in "
             f"{load_s:.1f} s; step costs (ms by token bucket) {costs}"
             + (" (perturbed by the traces)." if rows else " (no traces).")]
    if rows:
        lines += ["", "Per engine step (ms), kernel time by kind from the window's trace (a trace turns XLA's command "
                  "buffers off: kernels are launched one by one, so idle here is not the untraced run's):", "",
                  "| window | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for label, r in rows:
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v)
                                                   for v in r.values()) + " |")
    if tops:
        lines += ["", "The kernels outside the matrix products and attention that took the most time, per engine step:",
                  "", "| window | kind | kernel | ms / step | launches / step |", "|---|---|---|---:|---:|"]
        for label, top in tops:
            lines += [f"| {label} | {kind} | `{name[:80]}` | {ms:.3f} | {n:.0f} |" for kind, name, ms, n in top]
    if gemms:
        # which kernels XLA picked for a bucket's products and what each costs a launch (Triton fusions are
        # named by the product, cuBLAS kernels by their tiling)
        lines += ["", "The matrix-product kernels that took the most time, per engine step (rows: the step's bucket "
                  "rows):", "", "| window | rows | kernel | ms / step | launches / step | µs / launch |",
                  "|---|---:|---|---:|---:|---:|"]
        for label, nrows, top in gemms:
            lines += [f"| {label} | {nrows:.0f} | `{name[:80]}` | {ms:.3f} | {n:.0f} | {ms / n * 1e3:.1f} |"
                      for _, name, ms, n in top if n]
    if hosts:
        lines += ["", "The host events with the most time a step (inclusive: nested events each count their whole "
                  "span):", "", "| window | event | ms / step | count / step |", "|---|---|---:|---:|"]
        for label, top in hosts:
            lines += [f"| {label} | `{name[:90]}` | {ms:.3f} | {n:.1f} |" for name, ms, n in top]
    lines += ["", "The engine loop by running sequences (every step of the run; host: the step's time outside waiting for "
              "the device's results, of which call: inside the compiled steps' calls, where a call that returns only "
              "once the device has finished the previous step waits; wait: blocked on the results; a step that did "
              "not wait at all found its result ready):", "",
              "| running sequences | steps | host ms / step | of which call ms | wait ms / step | "
              "steps that did not wait |", "|---|---:|---:|---:|---:|---:|"]
    for lo, hi, k, host, wait, nowait, call in loop_by_running(loop):
        lines.append(f"| {lo}-{hi - 1} | {k} | {host:.2f} | {call:.2f} | {wait:.2f} | {nowait:.2f} |")
    lines += ["", "Decode-only steps (no prompt token) by running sequences, beside the step cost of their buckets "
              "(measured at warm-up): where host ms outside the calls reach the cost, the device waits for the host:",
              "", "| running sequences | steps | host ms / step | of which call ms | wait ms / step | "
              "share with under 0.5 ms of wait | bucket cost ms | (host - call) / cost |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for lo, hi, k, host, wait, short, cost, call in decode_steps_by_running(loop, costs):
        lines.append(f"| {lo}-{hi - 1} | {k} | {host:.2f} | {call:.2f} | {wait:.2f} | {short:.2f} | {cost:.2f} | "
                     f"{(host - call) / cost if cost else float('nan'):.2f} |")
    lines += ["", "reproduce: python -m benchmarks.gpu.profile_run --dataset " + args.dataset
              + f" --num-prompts {args.num_prompts} --windows {args.windows}"
              + (f" --engine '{args.engine}'" if args.engine else "") + (f" --quant {args.quant}" if args.quant else "")
              + (" --quantize-lm-head" if args.quantize_lm_head else "")]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_run.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
