"""Host time per engine step at 1, 64 and 256 running requests (CPU, tiny model).

The host time of a step is what ``EngineCore.step()`` spends outside waiting
for the device: scheduling, building the step's arrays, dispatch, and the
bookkeeping of the previous step's tokens (stop checks, detokenization,
outputs). It is measured in steady decode (every request running, none
finishing), and set beside the step's wall time.

    python benchmarks/engine_host_time.py [--out benchmarks/results/engine_host_time.md]
        [--batches 1 64 256] [--steps 60] [--repeats 3]

With ``--repeats R`` the steps are timed in R runs of ``--steps`` each and the
median run is reported (the host is shared: single runs are noisy).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time

import jax
import numpy as np


def measure(batch: int, steps: int, model_dir: str, repeats: int = 1) -> dict:
    from checkpoints.loader import load_model
    from jaxdyn import EngineConfig, EngineCore, SamplingParams

    mesh, loaded, tok = load_model(model_dir, dtype="float32")
    cfg = EngineConfig(num_pages=batch * 32 + 64, page_size=16, max_num_batched_tokens=max(256, batch),
                       max_num_seqs=max(batch, 1), max_model_len=512, token_buckets=None,
                       fail_on_compile=True, seed=0)
    eng = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, cfg)
    eng.warmup()
    rng = np.random.default_rng(0)
    for i in range(batch):
        eng.add_request(f"r{i}", rng.integers(0, 250, 16).tolist(),
                        SamplingParams(temperature=0.8, top_p=0.95, max_tokens=400, ignore_eos=True, seed=i))
    while eng.scheduler.waiting or any(s.num_computed < len(s.prompt_ids) for s in eng.scheduler.running):
        eng.step()
    for _ in range(5):
        eng.step()
    runs = []
    for _ in range(repeats):
        h0, w0, t0 = eng.host_time, eng.wait_time, time.perf_counter()
        for _ in range(steps):
            eng.step()
        wall = (time.perf_counter() - t0) / steps
        runs.append((((eng.host_time - h0) - (eng.wait_time - w0)) / steps, wall))
    host, wall = sorted(runs)[len(runs) // 2]
    assert len(eng.scheduler.running) == batch, (len(eng.scheduler.running), len(eng.scheduler.waiting), eng.metrics.requests_finished, eng.metrics.steps, eng.allocator.num_used, eng.num_pages, eng.scheduler.num_preemptions, sum(len(s.pages) for s in eng.scheduler.running), max(s.num_tokens for s in eng.scheduler.running))
    return dict(batch=batch, host_ms=host * 1e3, wall_ms=wall * 1e3, host_per_req_us=host / batch * 1e6)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    args = ap.parse_args()
    sys.path.insert(0, ".")
    from tests.support import make_byte_tokenizer, make_hf_checkpoint
    d = make_hf_checkpoint("llama3.1", tempfile.mkdtemp())
    make_byte_tokenizer(d)
    rows = [measure(b, args.steps, d, args.repeats) for b in args.batches]
    cmd = "python benchmarks/engine_host_time.py" + (f" --repeats {args.repeats}" if args.repeats > 1 else "")
    lines = [
        f"## Engine host time per step — {datetime.date.today()}",
        "",
        f"Device: CPU ({platform.processor() or platform.machine()}, {jax.device_count()} device), "
        f"jax {jax.__version__}; model: tiny random Llama (2 layers, hidden 64, vocab 258), float32; "
        "steady decode with sampling (temperature 0.8, top-p 0.95), detokenization on, overlap on"
        + (f"; median of {args.repeats} runs of {args.steps} steps." if args.repeats > 1 else "."),
        f"Command: `{cmd}`",
        "",
        "| running requests | host ms / step | wall ms / step | host / wall | host µs / request |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['host_ms']:.2f} | {r['wall_ms']:.2f} | "
                     f"{r['host_ms'] / r['wall_ms']:.2f} | {r['host_per_req_us']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
