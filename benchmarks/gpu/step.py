"""Model steps against the hardware: decode vs its memory floor, prefill vs the matmul rate.

Random bf16 weights in the exact shapes of the presets (``llama-3.2-1b``,
``llama-3.1-8b``), the real ``ModelRunner`` step (model, paged KV write, Pallas
attention on GPU, on-device greedy sampling), KV pages filled with random
values (never zeros).

- **Decode** at batch 1 / 8 / 64 / 256 and context 512 / 2048 (points whose KV
  does not fit beside the weights are skipped and listed): the device time of
  one step (the compiled step called back to back, cache donated, in steady state:
  ``steady_step_time``) against the
  floor = (weight bytes read + KV bytes read) / HBM bandwidth measured in the
  same run. Weight bytes read: every parameter except an untied input
  embedding (a lookup reads only the batch's rows). KV bytes read: batch x
  (context + 1) x layers x kv_heads x head_dim x 2 (K, V) x 2 B. Also the time
  through ``ModelRunner.execute`` (host packing and transfer included).
- **Prefill** of one 2048-token prompt: model FLOPs (2 x matmul parameters x
  tokens + causal attention 4 x layers x q_heads x head_dim x keys seen + the
  last row's logits) over time, as a share of a bf16 8192^3 matmul measured in
  the same run (MFU).

    python -m benchmarks.gpu.step [--models llama-3.2-1b,llama-3.1-8b] [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import _table, measure_bandwidth, measure_matmul
from checkpoints.loader import load_model
from jaxdyn.engine.runner import ModelRunner, RunnerConfig, SequenceWork

PAGE = 16
PREFILL = 2048


def _leaf_bytes(state) -> dict[str, int]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[name] = leaf.size * leaf.dtype.itemsize
    return out


def model_bytes_and_flops(loaded) -> tuple[int, int, int]:
    """(weight bytes a decode step reads, matmul parameters per token, lm_head parameters)."""
    cfg = loaded.config
    sizes = _leaf_bytes(loaded.state)
    itemsize = jax.tree.leaves(loaded.state)[0].dtype.itemsize
    embed = sum(v for k, v in sizes.items() if "embed_tokens" in k)
    lm_head = sum(v for k, v in sizes.items() if "lm_head" in k)
    total = sum(sizes.values())
    read = total if cfg.tie_word_embeddings else total - embed
    norms_and_bias = sum(v for k, v in sizes.items() if "norm" in k or "bias" in k)
    head_params = (embed if cfg.tie_word_embeddings else lm_head) // itemsize
    matmul_params = (total - embed - lm_head - norms_and_bias) // itemsize
    return read, matmul_params, head_params


def decode_runner(loaded, mesh, points, *, prefill_tokens: int = 0) -> ModelRunner:
    """A runner whose buckets are exactly the (batch, context) decode points (and one prefill
    of ``prefill_tokens``), with enough pages for the largest point and random KV pages."""
    pages_per = {c: pages_for(c) for _, c in points}
    prefill_pages = {pages_for(prefill_tokens - 1)} if prefill_tokens else set()
    num_pages = max([b * pages_per[c] for b, c in points] + list(prefill_pages)) + 1
    runner = ModelRunner(loaded.graphdef, loaded.state, mesh, RunnerConfig(
        page_size=PAGE, num_pages=num_pages,
        max_num_batched_tokens=max([max(b, 8) for b, _ in points] + [prefill_tokens]),
        max_num_seqs=max(b for b, _ in points), max_model_len=max(pages_per.values()) * PAGE,
        token_buckets=tuple(sorted({max(b, 8) for b, _ in points} | ({prefill_tokens} - {0}))),
        page_buckets=tuple(sorted(set(pages_per.values()) | prefill_pages))))
    _fill_kv_random(runner)
    return runner


def pages_for(context: int) -> int:
    """Pages a sequence of ``context`` cached tokens needs to decode one more."""
    return -(-(context + 1) // PAGE)


def decode_work(rng, runner: ModelRunner, vocab_size: int, batch: int, context: int) -> list[SequenceWork]:
    """One decode token for each of ``batch`` sequences of ``context`` cached tokens, shuffled pages."""
    n = pages_for(context)
    perm = rng.permutation(runner.config.num_pages - 1)[:batch * n].reshape(batch, n)
    return [SequenceWork(token_ids=[int(rng.integers(0, vocab_size))], num_computed=context,
                         page_ids=perm[i].tolist()) for i in range(batch)]


def run_back_to_back(runner: ModelRunner, compiled, args, steps: int):
    """Call the compiled step ``steps`` times on the same inputs (cache donated and chained);
    returns the last step's sampled ids without waiting for them."""
    kv, tp = runner.kv_cache, runner.token_pages
    for _ in range(steps):
        kv, tp, sampled, *_ = compiled(runner.state, kv, tp, runner.prev_sampled, *args)
    runner.kv_cache, runner.token_pages = kv, tp
    return sampled


def _fill_kv_random(runner: ModelRunner, seed: int = 0) -> None:
    """Random KV pages (never zeros), one layer at a time so the cache is never held twice."""
    cache = list(runner.kv_cache)
    runner.kv_cache = cache
    for i, (k, _) in enumerate(cache):
        f = jax.jit(lambda key, like=k: jax.random.normal(key, like.shape, jnp.float32).astype(like.dtype),
                    out_shardings=k.sharding)
        cache[i] = None
        cache[i] = (f(jax.random.key(seed + 2 * i)), f(jax.random.key(seed + 2 * i + 1)))
    jax.block_until_ready(cache)


def steady_step_time(runner: ModelRunner, compiled, args, reps: int) -> float:
    """Median seconds per compiled step in steady state.

    A run of back-to-back steps also pays, once, the host's dispatch of its first step (the GPU
    waits for it: 1.7 ms for the 8B shape) and the wait for its last: the time of ``reps`` steps
    is taken from that of ``3 * reps`` (``(t_long - t_short) / (2 * reps)``), so what is left is
    the step as a serving loop that dispatches ahead of the GPU sees it."""
    jax.block_until_ready(run_back_to_back(runner, compiled, args, 3))

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(run_back_to_back(runner, compiled, args, n))
        return time.perf_counter() - t0

    times = []
    for _ in range(3):   # median of three differences
        short, long = timed(reps), timed(3 * reps)
        times.append(max(long - short, 1e-9) / (2 * reps))
    return float(np.median(times))


def _time_device_steps(runner: ModelRunner, work, reps: int) -> tuple[float, float]:
    """(``steady_step_time``, seconds to prepare the step: compiling it, mostly)."""
    t0 = time.perf_counter()
    compiled, args, _ = runner.prepare(work)
    compile_s = time.perf_counter() - t0
    return steady_step_time(runner, compiled, args, reps), compile_s


def _time_runner_steps(runner: ModelRunner, work, reps: int) -> float:
    runner.step(work)
    t0 = time.perf_counter()
    for _ in range(reps):
        runner.step(work)
    return (time.perf_counter() - t0) / reps


def bench_model(name: str, bandwidth: float, matmul: float, batches, contexts, rng, tp: int = 1
                ) -> tuple[list, list, list]:
    """With ``tp`` > 1 the floor is the bytes over ``tp`` devices' bandwidth (each reads its shard)
    and MFU is over ``tp`` devices' matmul rate."""
    mesh, loaded, _ = load_model(name, load_format="dummy", dtype="bfloat16", tp=tp)
    cfg = loaded.config
    w_read, matmul_params, head_params = model_bytes_and_flops(loaded)
    kv_per_token = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * 2
    stats = jax.devices()[0].memory_stats() or {}
    free = stats.get("bytes_limit", 80e9) - stats.get("bytes_in_use", w_read)
    kv_budget = (free - 10e9) * tp     # activations, logits, compiled workspaces; KV split over tp
    points, skipped = [], []
    for c in contexts:
        for b in batches:
            (points if b * pages_for(c) * PAGE * kv_per_token <= kv_budget else skipped).append((b, c))
    bandwidth, matmul = bandwidth * tp, matmul * tp
    runner = decode_runner(loaded, mesh, points, prefill_tokens=PREFILL)
    num_pages = runner.config.num_pages
    print(f"{name}: weights read per step {w_read / 1e9:.2f} GB, KV {kv_per_token} B/token, "
          f"{num_pages} pages, skipped {skipped}", flush=True)

    decode = []
    for b, c in points:
        work = decode_work(rng, runner, cfg.vocab_size, b, c)
        dev_s, compile_s = _time_device_steps(runner, work, reps=10)
        host_s = _time_runner_steps(runner, work, reps=10)
        kv_read = b * (c + 1) * kv_per_token
        floor = (w_read + kv_read) / bandwidth
        decode.append(dict(model=name if tp == 1 else f"{name} TP{tp}", batch=b, context=c, step_ms=dev_s * 1e3, floor_ms=floor * 1e3,
                           of_floor=dev_s / floor, runner_ms=host_s * 1e3,
                           tok_s=b / host_s, compile_s=compile_s))
        print(f"decode {name} b={b} c={c}: {dev_s * 1e3:.2f} ms = {dev_s / floor:.2f}x floor "
              f"({floor * 1e3:.2f} ms); through the runner {host_s * 1e3:.2f} ms", flush=True)

    prefill = []
    pages = rng.permutation(num_pages - 1)[:PREFILL // PAGE].tolist()
    work = [SequenceWork(token_ids=rng.integers(0, cfg.vocab_size, PREFILL).tolist(), num_computed=0,
                         page_ids=pages)]
    dev_s, compile_s = _time_device_steps(runner, work, reps=5)
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (PREFILL * (PREFILL + 1) / 2)
    flops = 2 * matmul_params * PREFILL + attn + 2 * head_params
    prefill.append(dict(model=name if tp == 1 else f"{name} TP{tp}", tokens=PREFILL, ms=dev_s * 1e3, tflops=flops / dev_s / 1e12,
                        mfu=flops / dev_s / matmul, attn_share=attn / flops, compile_s=compile_s))
    print(f"prefill {name} {PREFILL}: {dev_s * 1e3:.1f} ms, {flops / dev_s / 1e12:.0f} TFLOP/s "
          f"= {flops / dev_s / matmul:.2f} MFU", flush=True)
    del runner, loaded
    return decode, prefill, [dict(model=name, batch=b, context=c) for b, c in skipped]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--out", help="markdown report (rewritten after each model)")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 64, context 2048 only")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (floor over tp devices)")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    rng = np.random.default_rng(0)
    small = dev.platform != "gpu"
    bandwidth = measure_bandwidth(0.25 if small else 4.0)
    matmul = measure_matmul(512 if small else 8192)
    print(f"HBM {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul / 1e12:.0f} TFLOP/s", flush=True)
    batches, contexts = ((1, 64), (2048,)) if args.quick else ((1, 8, 64, 256), (512, 2048))
    cmd = "python -m benchmarks.gpu.step" + (f" --models {args.models}") + (
        " --quick" if args.quick else "") + (f" --tp {args.tp}" if args.tp != 1 else "") + (
        f" --out {args.out}" if args.out else "")
    decode, prefill, skipped = [], [], []
    report = ""
    for name in args.models.split(","):
        d, p, s = bench_model(name, bandwidth, matmul, batches, contexts, rng, tp=args.tp)
        decode += d
        prefill += p
        skipped += s
        report = "\n".join([
            f"## Model steps — {datetime.date.today().isoformat()}", "",
            f"Device: {dev.device_kind}, jax {jax.__version__}, Python {platform.python_version()}. "
            f"Command: `{cmd}`.", "",
            f"Measured in the same run: HBM bandwidth **{bandwidth / 1e12:.2f} TB/s** (donated in-place "
            f"`x + 1`, read + write); bf16 matmul **{matmul / 1e12:.0f} TFLOP/s** (8192³).", "",
            "### Decode step (random bf16 weights, greedy, Pallas attention)", "",
            "`step ms`: the compiled step back to back (device time); `× floor`: over (weight bytes + "
            "KV bytes read) / HBM bandwidth; `runner ms`: through `ModelRunner.step` (host packing, "
            "transfer and the wait for the sampled ids included).", "",
            _table(decode, [("model", "model", ""), ("batch", "batch", "d"), ("context", "context", "d"),
                            ("step_ms", "step ms", ".2f"), ("floor_ms", "floor ms", ".2f"),
                            ("of_floor", "× floor", ".2f"), ("runner_ms", "runner ms", ".2f"),
                            ("tok_s", "tok/s (runner)", ".0f"), ("compile_s", "compile s", ".1f")]),
            ("Skipped (KV does not fit beside the weights): "
             + ", ".join(f"{r['model']} b{r['batch']} c{r['context']}" for r in skipped) + "." if skipped else ""),
            "", f"### Prefill of one {PREFILL}-token prompt", "",
            _table(prefill, [("model", "model", ""), ("tokens", "tokens", "d"), ("ms", "ms", ".1f"),
                             ("tflops", "TFLOP/s", ".0f"), ("mfu", "MFU", ".2f"),
                             ("attn_share", "attention share of FLOPs", ".2f"), ("compile_s", "compile s", ".1f")]),
        ])
        if args.out:
            with open(args.out, "w") as f:
                f.write(report + "\n")
    print(report)
    return report


if __name__ == "__main__":
    main()
