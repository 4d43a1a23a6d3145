"""The prefill kernel on the steps a ShareGPT-shaped run makes: its block sizes and programs, timed on the device.

A 2,048-token step of the suite's run (1,000 ShareGPT-shaped prompts, 8B shape, fp8 KV pages) holds ~430 decode
rows and the chunks of ~8 prompts; its prefill kernel took 2.28 ms of the step (71 µs a layer, session 40's
profile on an H200) for ~6.5 GFLOP a layer of causal products: ~0.1 of the bf16 matmul rate. The kernel's blocks
were tuned on 2,048-token chunks, where throughput counts; here a step's chunks are short and its longest
chunk's last items (each a chain of page blocks) may set the time.

This probe takes the 2,048-token steps of ``benchmarks.schedule_sim``'s schedule of that run (the engine's
policy: running sequences first, a decode token each or their next chunk, then waiting prompts admitted in
order), builds each step's inputs as the engine's entry point hands them to the prefill kernel (2,048 query
rows, 1,024 sequence slots, decode rows of one token skipped, fp8 pages, a page table of 128 pages a
slot), and times ``ragged_prefill_attention_kernel`` with each variant of blocks: 32 calls in one jitted program,
each on its own layer's pages (as a step's 32 layers), wall time / 32, the median of ``--reps``.

    python -m benchmarks.gpu.prefill_probe [--steps 12] [--variants ROWS:PAGES:WARPS:STAGES:PROGRAMS,...]

    python -m benchmarks.gpu.prefill_probe --long 2048@8192,1024@16384+1024@1024 [--variants ...]

times given steps instead of the schedule's (``--long``): each a ``+``-joined list of chunks ``Q@KV`` (a chunk of Q
query tokens ending at key KV), the page table as wide as the longest context needs: long prompts' chunks, where a
chunk's few items each loop over many key blocks.

prints, per variant, µs a call averaged over the steps, that / the default's, and the causal products' TFLOP/s
as a share of a bf16 matmul measured in the same process; then each step's composition (chunks, the longest
chunk's end) and each variant's µs on it. On a CPU (``--interpret``) it checks a variant's output against the
default's on one small step instead of timing.
"""

from __future__ import annotations

import argparse

import numpy as np

DEFAULT_VARIANT = "128:4:4:3:1056"
VARIANTS = ("128:4:4:3:1056,128:4:4:3:0,128:8:4:3:1056,128:2:4:3:1056,128:8:8:3:1056,128:4:8:3:1056,"
            "64:4:4:3:1056,64:8:4:3:1056,256:4:8:3:1056,128:4:4:2:1056,128:4:4:4:1056,128:4:4:3:528,"
            "128:4:4:3:2112")
PAGE, PAGES_PER_SLOT, Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS, TOKENS = 16, 128, 32, 8, 128, 32, 2048
POOL_PAGES = 1024                # a layer's pages: more than any step's chunks need (~200)


def step_compositions(num_prompts: int = 1000, budget: int = TOKENS, max_seqs: int = 1024):
    """[(index, [(q_len, kv_len), ...])] of the schedule's steps (``benchmarks.schedule_sim.schedule``) of more than
    half the budget with a prompt chunk, each sequence in the step's order (running first, then admitted)."""
    from benchmarks.schedule_sim import schedule
    from serving.bench.datasets import seeded_rng, sharegpt_lengths
    prompts, outputs = sharegpt_lengths(seeded_rng(0, 1, 0), num_prompts, "chatgpt")
    steps = []
    for index, rows in enumerate(schedule(prompts.tolist(), outputs.tolist(), max_seqs, budget)):
        seqs = [(q, kv) for q, kv, _ in rows]
        if sum(q for q, _ in seqs) > budget // 2 and any(q > 1 for q, _ in seqs):
            steps.append((index, seqs))
    return steps


def parse_variant(text: str):
    from pallas_kernels.ragged_prefill import PrefillBlockSizes
    rows, pages, warps, stages, programs = (int(x) for x in text.split(":"))
    return PrefillBlockSizes(rows, pages, warps, stages, "rows", programs)


def causal_flops(seqs) -> float:
    """QK^T and PV of the chunks (q_len > 1): 2 flops a multiply-add, each query over the keys it sees."""
    keys = sum(q * (kv - q) + q * (q + 1) / 2 for q, kv in seqs if q > 1)
    return 4 * Q_HEADS * HEAD_DIM * keys


def parse_long(text: str):
    """``Q@KV+Q@KV,...`` -> [(label, [(q_len, kv_len), ...])]: steps of chunks (q_len <= kv_len, q_len > 1, at most
    TOKENS query tokens a step)."""
    steps = []
    for i, step in enumerate(text.split(",")):
        seqs = []
        for chunk in step.split("+"):
            q, kv = (int(x) for x in chunk.split("@"))
            if not 1 < q <= kv:
                raise ValueError(f"{chunk}: expected Q@KV with 1 < Q <= KV")
            seqs.append((q, kv))
        if sum(q for q, _ in seqs) > TOKENS:
            raise ValueError(f"{step}: more than {TOKENS} query tokens")
        steps.append((f"long {i} ({step})", seqs))
    return steps


def step_inputs(seqs, layers: int, rng, interpret: bool = False, shape: tuple[int, int] | None = None):
    """(q, [k_pages, v_pages] a layer, kv_lens, page_table, cu_q_lens) of one step as the entry point gives them to
    the prefill kernel; the chunks' pages distinct and shuffled, each layer its own pool; decode rows' tables
    point at page 0 (the kernel skips them). ``shape``: (pages a slot, pages a layer's pool) at least, so that
    steps of one shape share a compilation."""
    import jax
    import jax.numpy as jnp
    tokens = 64 if interpret else TOKENS
    # one shape for every step (one compilation a variant): the engine's 1,024 slots, a pool of at least POOL_PAGES
    slots = 8 if interpret else 1024
    need = [-(-kv // PAGE) if q > 1 else 0 for q, kv in seqs]
    width, pool = shape or (0, 0)
    pages_per_slot = 8 if interpret else max(PAGES_PER_SLOT, max(need), width)
    num_pages = max(1, sum(need)) if interpret else max(POOL_PAGES, sum(need), pool)
    perm = rng.permutation(num_pages)
    table = np.zeros((slots, pages_per_slot), np.int32)
    at = 0
    for s, n in enumerate(need):
        table[s, :n] = perm[at:at + n]
        at += n
    kv_lens = np.zeros((slots,), np.int32)
    kv_lens[:len(seqs)] = [kv for _, kv in seqs]
    cu = np.zeros((slots + 1,), np.int32)
    cu[1:len(seqs) + 1] = np.cumsum([q for q, _ in seqs])
    cu[len(seqs) + 1:] = cu[len(seqs)]
    key = jax.random.key(int(rng.integers(1 << 30)))
    q = jax.random.normal(key, (tokens, Q_HEADS, HEAD_DIM), jnp.bfloat16)
    pools = []
    for layer in range(layers):
        k1, k2 = jax.random.split(jax.random.fold_in(key, layer + 1))
        shape = (KV_HEADS, num_pages, PAGE, HEAD_DIM)
        pools.append((jax.random.normal(k1, shape, jnp.bfloat16).astype(jnp.float8_e4m3fn),
                      jax.random.normal(k2, shape, jnp.bfloat16).astype(jnp.float8_e4m3fn)))
    return q, pools, jnp.asarray(kv_lens), jnp.asarray(table), jnp.asarray(cu)


def layer_stack(blocks, interpret: bool = False):
    """A jitted program calling the prefill kernel once a layer's pages (the entry point's call: min_q_len 1)."""
    import functools

    import jax

    from pallas_kernels.ragged_prefill import ragged_prefill_attention_kernel
    kernel = functools.partial(ragged_prefill_attention_kernel, sm_scale=HEAD_DIM ** -0.5, min_q_len=1,
                               blocks=blocks, interpret=interpret)

    @jax.jit
    def run(q, pools, kv_lens, table, cu):
        # every layer's output returned: a pallas_call whose result is unused is dropped by XLA
        return [kernel(q, k, v, kv_lens, table, cu) for k, v in pools]
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.prefill_probe")
    p.add_argument("--steps", type=int, default=12, help="2,048-token steps of the schedule, evenly spaced")
    p.add_argument("--variants", default=VARIANTS, help="ROWS:PAGES:WARPS:STAGES:PROGRAMS, comma separated "
                   f"(block_rows, pages_per_block, num_warps, num_stages, persistent_programs); first: the default "
                   f"{DEFAULT_VARIANT}")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--long", default=None, metavar="Q@KV[+Q@KV...],...",
                   help="time these steps instead of the schedule's: chunks of Q query tokens ending at key KV")
    p.add_argument("--interpret", action="store_true", help="check the variants' outputs on a CPU, no timing")
    args = p.parse_args(argv)
    long_steps = None
    if args.long:
        try:
            long_steps = parse_long(args.long)
        except ValueError as e:
            p.error(f"--long: {e}")
    try:
        variants = [(v, parse_variant(v)) for v in args.variants.split(",")]
    except (TypeError, ValueError):
        p.error(f"--variants: expected ROWS:PAGES:WARPS:STAGES:PROGRAMS integers, got {args.variants!r}")
    if args.steps < 1 or args.reps < 1:
        p.error("--steps and --reps must be at least 1")

    import jax
    rng = np.random.default_rng(0)
    if args.interpret:
        seqs = [(1, 40), (20, 20), (9, 30), (1, 7), (17, 50)]
        inputs = step_inputs(seqs, 1, rng, interpret=True)
        from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
        q, ((k, v),), kv_lens, table, cu = inputs
        rows = np.concatenate([np.arange(c0, c0 + n) for (n, _), c0 in zip(seqs, np.asarray(cu)[:-1]) if n > 1])
        want = np.asarray(ragged_paged_attention_reference(q, k, v, kv_lens, table, cu, sm_scale=HEAD_DIM ** -0.5),
                          np.float32)[rows]
        for name, blocks in variants:
            out = np.asarray(layer_stack(blocks, interpret=True)(*inputs)[-1], np.float32)[rows]
            err = float(np.abs(out - want).max())
            print(f"{name}: max |diff| to the reference {err:.3g} (|reference| {np.abs(want).mean():.3g})")
            if not np.isfinite(out).all() or err > 2e-2:
                print("MISMATCH")
                return 1
        return 0

    from benchmarks.kernels import _median_time, measure_matmul
    shape = None            # the schedule's steps fit one shape; given steps share the widest table and pool
    if long_steps:
        steps = long_steps
        pages = [[-(-kv // PAGE) for _, kv in seqs] for _, seqs in steps]
        shape = (max(map(max, pages)), max(map(sum, pages)))
        what = f"{len(steps)} given steps"
    else:
        all_steps = step_compositions()
        pick = np.linspace(0, len(all_steps) - 1, min(args.steps, len(all_steps))).round().astype(int)
        steps = [all_steps[i] for i in sorted(set(pick.tolist()))]
        what = f"{len(all_steps)} steps of over {TOKENS // 2} tokens with a chunk in the schedule, {len(steps)} timed"
    matmul = measure_matmul()
    print(f"{jax.devices()[0].device_kind}; bf16 matmul {matmul / 1e12:.0f} TFLOP/s in this process; {what}",
          flush=True)
    times = {name: [] for name, _ in variants}
    for index, seqs in steps:
        inputs = step_inputs(seqs, LAYERS, rng, shape=shape)
        chunks = [(q, kv) for q, kv in seqs if q > 1]
        line = []
        for name, blocks in variants:
            try:
                t = _median_time(layer_stack(blocks), *inputs, reps=args.reps) / LAYERS
            except Exception as e:  # noqa: BLE001  (a variant Triton cannot compile: said, the others go on)
                print(f"  {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                t = float("nan")
            times[name].append(t)
            line.append(f"{name} {t * 1e6:.1f}")
        print(f"step {index}: {len(seqs)} rows, {len(chunks)} chunks ({sum(q for q, _ in chunks)} tokens; longest "
              f"ends at {max(kv for _, kv in chunks)}), {causal_flops(seqs) / 1e9:.2f} GFLOP a layer | "
              + " | ".join(line), flush=True)
        del inputs
    flops = np.mean([causal_flops(s) for _, s in steps])
    base = np.nanmean(times[variants[0][0]])
    print("\n| variant (rows:pages:warps:stages:programs) | µs a call (mean of steps) | x default | TFLOP/s | of "
          "matmul |\n|---|---:|---:|---:|---:|")
    for name, _ in variants:
        t = float(np.nanmean(times[name])) if not np.isnan(times[name]).all() else float("nan")
        print(f"| {name} | {t * 1e6:.1f} | {t / base:.3f} | {flops / t / 1e12:.0f} | {flops / t / matmul:.3f} |")
    which = f"--long {args.long}" if args.long else f"--steps {args.steps}"
    print(f"\nreproduce: python -m benchmarks.gpu.prefill_probe {which} --reps {args.reps} --variants {args.variants}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
