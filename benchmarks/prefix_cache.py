"""What the radix prefix cache saves: prefill tokens computed in a ten-turn chat, and TTFT of a cached prefix.

    python benchmarks/prefix_cache.py                                   # tiny model, CPU
    python benchmarks/prefix_cache.py --model llama-3.2-1b --dtype bfloat16   # dummy weights, GPU

1. The ten-turn chat of the product's problem statement, replayed with token ids: turn 1's prompt is a
   500-token system prompt and first message; every later turn resends the whole history plus the
   previous 100-token answer and a new 100-token message (prompts of 500, 700, ..., 2,300 tokens:
   14,000 in all). Answers are the model's own greedy tokens. The engine's counter of prompt tokens
   actually computed (``metrics.computed_prefill_tokens``) is read with and without the cache.
2. TTFT of a request whose 2,000-token prefix is cached (another request with that prefix finished
   before it) against the same request with a prefix never seen, median of several, same engine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(model, load_format, dtype, cache: bool, max_model_len: int):
    from checkpoints.loader import load_model
    from jaxdyn import EngineConfig, EngineCore

    mesh, loaded, tok = load_model(model, dtype=dtype, load_format=load_format)
    cfg = EngineConfig(page_size=16, max_num_batched_tokens=512, max_num_seqs=8, max_model_len=max_model_len,
                       fail_on_compile=True, seed=0, enable_prefix_caching=cache,
                       num_pages=max_model_len // 16 * 4)
    eng = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, cfg)
    eng.warmup()
    return eng


def run_one(eng, rid, prompt, max_tokens):
    from jaxdyn import SamplingParams
    t0 = time.perf_counter()
    eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    ttft, final = None, None
    while final is None:
        for out in eng.step():
            if out.request_id == rid:
                if ttft is None and out.outputs[0].token_ids:
                    ttft = time.perf_counter() - t0
                if out.finished:
                    final = out
    while eng.has_unfinished():
        eng.step()
    return final, ttft


def ten_turns(eng, vocab) -> tuple[int, int, int]:
    """(prompt tokens sent, prompt tokens computed, cached tokens reported)."""
    rng = np.random.default_rng(0)
    history = rng.integers(3, vocab, 500).tolist()
    sent = cached = 0
    c0 = eng.metrics.computed_prefill_tokens
    for turn in range(10):
        out, _ = run_one(eng, f"turn{turn}", history, 100)
        sent += len(history)
        cached += out.num_cached_tokens
        history = history + out.outputs[0].token_ids + rng.integers(3, vocab, 100).tolist()
    return sent, eng.metrics.computed_prefill_tokens - c0, cached


def ttft_pair(eng, vocab, prefix_len: int, reps: int) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    cold, warm = [], []
    for r in range(reps):
        prefix = rng.integers(3, vocab, prefix_len).tolist()
        _, t_cold = run_one(eng, f"cold{r}", prefix + rng.integers(3, vocab, 16).tolist(), 1)
        _, t_warm = run_one(eng, f"warm{r}", prefix + rng.integers(3, vocab, 16).tolist(), 1)
        cold.append(t_cold)
        warm.append(t_warm)
    return statistics.median(cold), statistics.median(warm)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    import jax

    rows = {}
    for cache in (False, True):
        eng = build(args.model, args.load_format, args.dtype, cache, max_model_len=4096)
        vocab = eng.model_config.vocab_size
        sent, computed, cached = ten_turns(eng, vocab)
        rows[cache] = (sent, computed, cached)
        if cache:
            cold, warm = ttft_pair(eng, vocab, 2000, args.reps)
        del eng

    cmd = "python benchmarks/prefix_cache.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != ap.get_default(k))
    dev = jax.devices()[0].device_kind
    print(f"# prefix cache: {args.model} ({args.load_format} weights, {args.dtype}) on {dev}, "
          f"{datetime.date.today().isoformat()}")
    print(f"# command: {cmd}\n")
    print("| ten-turn chat | prompt tokens sent | prefill tokens computed | cached tokens reported |")
    print("|---|---|---|---|")
    for cache in (False, True):
        sent, computed, cached = rows[cache]
        print(f"| {'with' if cache else 'without'} prefix cache | {sent:,} | {computed:,} | {cached:,} |")
    print(f"\ncomputed with / without: {rows[True][1] / rows[False][1]:.3f}")
    print(f"\n| 2,000-token prefix + 16 new tokens | TTFT (median of {args.reps}) |")
    print("|---|---|")
    print(f"| prefix not cached | {cold * 1e3:.1f} ms |")
    print(f"| prefix cached | {warm * 1e3:.1f} ms |")
    print(f"\nTTFT cached / uncached: {warm / cold:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
