"""How the token buckets and the sequence cap shape a run's length: a simulation, no device.

A simplified copy of the engine's schedule (running sequences first, a decode token each or their next
prompt chunk, then waiting requests admitted in arrival order while the token budget and ``max_num_seqs``
allow) over a dataset's (prompt, output) lengths, with each step costed as the measured 8B step on one
H200 (2026-12-02, ``gpu_suite_h200.md``): the GEMMs of the padded bucket, max(4.3 ms of weight reading,
0.0268 ms a token of compute: a 2048-token step 55 ms, measured 53.3), + 0.5 ms of small kernels, + the KV
read of the decode rows at 3.5 TB/s, + 0.3 ms. Validated against the measured runs: 1,000 ShareGPT-shaped
requests, buckets 16/256/2048 and 256 sequences, 39.9 s simulated / 36.3 s measured; random 1024/128,
37.1 s / 35.4 s.

    python -m benchmarks.schedule_sim [--dataset sharegpt-lengths|random] [--num-prompts 1000]

prints, for each configuration, the simulated seconds, output tok/s and the share of bucket rows that
held real tokens, and each one's time as a ratio to the first (the suite's engine before this change).

    python -m benchmarks.schedule_sim --costs 16:5.21,128:6.08,512:13.12,2048:42.75 [--kv-tb-s 4.0]

costs each step from a table of measured step costs instead (ms a step of each token bucket, back to back:
what ``jaxdyn serve`` / the offline suite measure at warm-up and print), with the engine's 1,024 sequences,
whole steps and split steps (``ModelRunner.plan``: the cheapest set of buckets that holds the step), steps
without padding (a bucket of every size, each costed by linear interpolation between the measured buckets: what
buckets alone could win at these costs), and a bound: an engine whose every step costs exactly its tokens at
the largest bucket's rate a token, never less than ``--floor-ms`` (the one-sequence decode step measured on the
device), plus the decode rows' KV read at ``--kv-tb-s``.
"""

from __future__ import annotations

import argparse

import numpy as np

from serving.bench.datasets import SHAREGPT_REPLY_SHAPES, seeded_rng, sharegpt_lengths

CONFIGS = (   # (token buckets, max_num_seqs)
    ((16, 256, 2048), 256),
    ((16, 256, 512, 1024, 2048), 256),
    ((16, 128, 512, 2048), 512),
    ((16, 128, 512, 1024, 2048), 512),
    ((16, 64, 256, 512, 1024, 2048), 512),
)
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2     # 8B shape: layers x (K, V) x kv heads x head_dim x bf16


def step_ms(bucket: int, kv_tokens: int) -> float:
    return max(4.3, 0.0268 * bucket) + 0.5 + kv_tokens * KV_BYTES_PER_TOKEN / 3.5e12 * 1e3 + 0.3


def schedule(prompts, outputs, max_seqs: int, budget: int = 2048, min_free_slots: int = 1):
    """The run's steps in turn, every request waiting at t = 0: each a list of its rows' (query tokens, the
    sequence's context after the step, decode row or not), running sequences first (a decode token each or their
    next prompt chunk), then the waiting requests it admits in order.

    ``min_free_slots`` > 1: a policy the engine does not have, admitting waiting requests only once that
    many slots are free (or while fewer than a quarter of ``max_seqs`` run), so that freed slots' prompts
    fill one step instead of padding several."""
    waiting = list(range(len(prompts)))[::-1]
    running: list[list[int]] = []            # [request, prompt tokens computed, tokens generated]
    while waiting or running:
        tokens = 0
        step = []
        for r in running:
            i = r[0]
            if r[1] < prompts[i]:
                take = min(prompts[i] - r[1], budget - tokens)
                if take <= 0:
                    continue
                r[1] += take
                tokens += take
                step.append((take, r[1], False))
            else:
                if tokens + 1 > budget:
                    continue
                tokens += 1
                step.append((1, prompts[i] + r[2] + 1, True))
                r[2] += 1
        admit = max_seqs - len(running) >= min_free_slots or len(running) < max_seqs // 4
        while admit and waiting and len(running) < max_seqs and tokens < budget:
            i = waiting.pop()
            take = min(prompts[i], budget - tokens)
            running.append([i, take, 0])
            tokens += take
            step.append((take, take, False))
        yield step
        running = [r for r in running if not (r[1] >= prompts[r[0]] and r[2] >= outputs[r[0]])]


def simulate(prompts, outputs, buckets, max_seqs: int, budget: int = 2048, min_free_slots: int = 1
             ) -> tuple[float, int, float]:
    """(seconds, steps, real tokens / bucket rows) of one run of ``schedule``'s steps, each costed by ``step_ms``
    at its bucket with its decode rows' KV read."""
    total_ms, steps, rows, real = 0.0, 0, 0, 0
    for step in schedule(prompts, outputs, max_seqs, budget, min_free_slots):
        tokens = sum(q for q, _, _ in step)
        kv = sum(context - 1 for _, context, decode in step if decode)      # the KV each decode row reads
        bucket = next(b for b in buckets if b >= tokens and min(b, max_seqs) >= len(step))
        total_ms += step_ms(bucket, kv)
        steps += 1
        rows += bucket
        real += tokens
    return total_ms / 1e3, steps, real / rows


def _kv_ms(kv_tokens: int, kv_tb_s: float, attn_fixed_ms: float = 0.0) -> float:
    """ms to read ``kv_tokens`` tokens' KV (the 8B shape's) at ``kv_tb_s`` TB/s, plus ``attn_fixed_ms`` where there
    is any (the decode attention's cost a step that does not shrink with its bytes: the kernels' starts and loops'
    latency in every layer)."""
    return kv_tokens * KV_BYTES_PER_TOKEN / (kv_tb_s * 1e12) * 1e3 + (attn_fixed_ms if kv_tokens else 0.0)


def _costed_run(prompts, outputs, cost, largest: int, max_seqs: int) -> float:
    """Seconds of ``simulate`` with every step costed ``cost(tokens, kv_tokens)`` ms by its own token count
    (the bucket list 1..``largest``, ``largest`` tokens a step)."""
    global step_ms
    saved = step_ms
    try:
        step_ms = cost
        return simulate(prompts, outputs, tuple(range(1, largest + 1)), max_seqs, budget=largest)[0]
    finally:
        step_ms = saved


def measured_runs(prompts, outputs, costs: dict[int, float], kv_tb_s: float, floor_ms: float,
                  max_seqs: int = 1024, attn_fixed_ms: float = 0.0) -> list[tuple[str, float]]:
    """(label, seconds) of whole steps, split steps and the bound, each step costed from ``costs``
    (token bucket -> ms) plus its decode rows' KV read at ``kv_tb_s`` (``_kv_ms``, with ``attn_fixed_ms``)."""
    import functools
    buckets = tuple(sorted(costs))

    @functools.lru_cache(None)
    def split(tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        single = next(b for b in buckets if b >= tokens)
        return min([costs[single]] + [costs[b] + split(tokens - b) for b in buckets if b < single])

    def unpadded(tokens: int) -> float:
        """The cost of a step of exactly ``tokens`` rows: the measured costs interpolated linearly between
        buckets (no less than the smallest bucket's)."""
        if tokens <= buckets[0]:
            return costs[buckets[0]]
        hi = next(b for b in buckets if b >= tokens)
        lo = max(b for b in buckets if b < hi)
        return costs[lo] + (costs[hi] - costs[lo]) * (tokens - lo) / (hi - lo)

    rate = costs[buckets[-1]] / buckets[-1]
    models = (("whole steps", lambda t: costs[next(b for b in buckets if b >= t)]),
              ("split steps", split),
              ("no padding: every step its own tokens, its cost interpolated between the buckets'", unpadded),
              (f"bound: every step its tokens x {rate:.4f} ms, at least {floor_ms} ms", lambda t: max(floor_ms, rate * t)))
    return [(label, _costed_run(prompts, outputs,
                                lambda tokens, kv, cost=cost: cost(tokens) + _kv_ms(kv, kv_tb_s, attn_fixed_ms),
                                buckets[-1], max_seqs))
            for label, cost in models]


def bucket_breakdown(prompts, outputs, costs: dict[int, float], kv_tb_s: float, max_seqs: int = 1024,
                     attn_fixed_ms: float = 0.0) -> dict[int, tuple[int, float, float]]:
    """Where a run of whole steps spends its time: bucket -> (steps, seconds of the bucket's cost, seconds of
    its decode rows' attention: KV read at ``kv_tb_s`` and ``attn_fixed_ms``), each step costed as
    ``measured_runs``' whole steps."""
    buckets = tuple(sorted(costs))
    out = {b: [0, 0.0, 0.0] for b in buckets}

    def cost(tokens: int, kv: int) -> float:
        b = next(x for x in buckets if x >= tokens)
        kv_ms = _kv_ms(kv, kv_tb_s, attn_fixed_ms)
        out[b][0] += 1
        out[b][1] += costs[b] / 1e3
        out[b][2] += kv_ms / 1e3
        return costs[b] + kv_ms

    _costed_run(prompts, outputs, cost, buckets[-1], max_seqs)
    return {b: (n, c, k) for b, (n, c, k) in out.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.schedule_sim")
    p.add_argument("--dataset", choices=["sharegpt-lengths", "random"], default="sharegpt-lengths")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--replies", choices=SHAREGPT_REPLY_SHAPES, default="chatgpt",
                   help="sharegpt-lengths: the reply-length shape (serving.bench.datasets)")
    p.add_argument("--min-free-slots", type=int, default=1,
                   help="admit only once this many slots are free (a policy the engine does not have; 1: as it does)")
    p.add_argument("--costs", default=None, metavar="T:MS,...",
                   help="measured ms a step of each token bucket (e.g. 16:5.21,128:6.08,512:13.12,2048:42.75)")
    p.add_argument("--kv-tb-s", type=float, default=4.0,
                   help="with --costs: TB/s the decode rows' KV is read at (bf16 pages' bytes: twice the rate for "
                   "fp8 pages read at it)")
    p.add_argument("--attn-fixed-ms", type=float, default=0.0,
                   help="with --costs: ms each step with decode rows spends on attention beyond the KV's bytes (all "
                   "layers: e.g. 32 x 25 µs, the fixed part of call 3's entry-point fit, twentieth session)")
    p.add_argument("--order", choices=("fcfs", "lof"), default="fcfs",
                   help="the admission order: fcfs (arrival) or lof (largest output first: the engine's "
                        "schedule_policy='lof' with max_tokens the outputs' lengths)")
    p.add_argument("--by-bucket", action="store_true",
                   help="with --costs: also where the whole-steps run spends its time, bucket by bucket")
    p.add_argument("--floor-ms", type=float, default=4.82,
                   help="with --costs: the bound's least step (the one-sequence decode step on the device)")
    args = p.parse_args(argv)
    shape = f" ({args.replies} replies)" if args.dataset == "sharegpt-lengths" else ""
    if args.dataset == "random":
        prompts, outputs = np.full(args.num_prompts, 1024), np.full(args.num_prompts, 128)
    else:     # the prompts bench offline draws (seed 0)
        prompts, outputs = sharegpt_lengths(seeded_rng(0, 1, 0), args.num_prompts, args.replies)
    if args.order == "lof":
        order = np.argsort(-outputs, kind="stable")
        prompts, outputs = prompts[order], outputs[order]
    if args.costs:
        try:
            costs = {int(t): float(ms) for t, ms in (c.split(":") for c in args.costs.split(","))}
        except ValueError:
            p.error(f"--costs: expected TOKENS:MS pairs separated by commas, got {args.costs!r}")
        print(f"{args.dataset}{shape}, {args.num_prompts} requests ({int(prompts.sum())} prompt / {int(outputs.sum())} output "
              f"tokens), measured step costs {costs} ms, KV read at {args.kv_tb_s} TB/s"
              + (f" and {args.attn_fixed_ms} ms of attention a step with decode rows" if args.attn_fixed_ms else "")
              + ", 1,024 sequences:")
        print("| steps | seconds | output tok/s |\n|---|---:|---:|")
        for label, s in measured_runs(prompts.tolist(), outputs.tolist(), costs, args.kv_tb_s, args.floor_ms,
                                      attn_fixed_ms=args.attn_fixed_ms):
            print(f"| {label} | {s:.1f} | {outputs.sum() / s:,.0f} |")
        if args.by_bucket:
            parts = bucket_breakdown(prompts.tolist(), outputs.tolist(), costs, args.kv_tb_s,
                                     attn_fixed_ms=args.attn_fixed_ms)
            total = sum(c + k for _, c, k in parts.values())
            print("\nWhole steps, bucket by bucket (the bucket's measured cost, and its decode rows' attention):\n")
            print("| token bucket | steps | cost s | KV read s | share of the run |\n|---:|---:|---:|---:|---:|")
            for b, (n, c, k) in parts.items():
                print(f"| {b} | {n} | {c:.2f} | {k:.2f} | {(c + k) / total:.3f} |")
            print(f"| all | {sum(n for n, _, _ in parts.values())} | {sum(c for _, c, _ in parts.values()):.2f} | "
                  f"{sum(k for _, _, k in parts.values()):.2f} | 1.000 |")
        print(f"reproduce: python -m benchmarks.schedule_sim --dataset {args.dataset} --replies {args.replies} "
              f"--num-prompts {args.num_prompts} --costs {args.costs} --kv-tb-s {args.kv_tb_s} --floor-ms {args.floor_ms}"
              + (f" --attn-fixed-ms {args.attn_fixed_ms}" if args.attn_fixed_ms else "")
              + (" --by-bucket" if args.by_bucket else "") + (f" --order {args.order}" if args.order != "fcfs" else ""))
        return
    first = None
    print(f"{args.dataset}{shape}, {args.num_prompts} requests ({int(prompts.sum())} prompt / {int(outputs.sum())} "
          "output tokens), 8B step costs of the H200:")
    print("| token buckets | max_num_seqs | seconds | output tok/s | steps | real tokens / bucket rows | x first |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for buckets, seqs in CONFIGS:
        s, n, eff = simulate(prompts.tolist(), outputs.tolist(), buckets, seqs, min_free_slots=args.min_free_slots)
        first = first or s
        print(f"| {'/'.join(map(str, buckets))} | {seqs} | {s:.1f} | {outputs.sum() / s:,.0f} | {n} | {eff:.2f} "
              f"| {s / first:.2f} |")
    print(f"reproduce: python -m benchmarks.schedule_sim --dataset {args.dataset} --replies {args.replies} "
          f"--num-prompts {args.num_prompts} --min-free-slots {args.min_free_slots}")


if __name__ == "__main__":
    main()
