"""Host time per engine step at 1, 64 and 256 running requests (CPU, tiny model).

The host time of a step is what ``EngineCore.step()`` spends outside waiting
for the device: scheduling, building the step's arrays, dispatch, and the
bookkeeping of the previous step's tokens (stop checks, detokenization,
outputs). It is measured in steady decode (every request running, none
finishing), and set beside the step's wall time.

    python benchmarks/engine_host_time.py [--out benchmarks/results/engine_host_time.md]
        [--batches 1 64 256] [--steps 60] [--repeats 3]
        [--preset llama-3.1-8b] [--layers N] [--vocab V] [--prompt-len 16] [--greedy] [--gc-freeze]

With ``--repeats R`` the steps are timed in R runs of ``--steps`` each and the
median run is reported (the host is shared: single runs are noisy).

By default the model is the tests' tiny Llama (2 layers, vocab 258, byte-level
tokenizer). ``--preset NAME`` takes a preset's depth and vocabulary with a
word-level tokenizer over the whole vocabulary (``benchmarks.gpu.suite.model_dir``,
the GPU suite's), random weights, and a tiny width (hidden 64), so the costs that
grow with the model's shape on the host show up -- dispatching an executable of
a few hundred arrays (32 layers of weights and 64 KV arrays for Llama-3.1-8B),
detokenizing over a 128k vocabulary -- while the CPU's device time stays small.
``--layers`` / ``--vocab`` override the depth and vocabulary; ``--greedy`` and
``--prompt-len`` give the GPU suite's requests (greedy, 512-token prompts).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np


# The width of a ``--preset`` model: tiny, so the CPU's device time stays small.
TINY_WIDTH = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, torch_dtype="float32")


@contextlib.contextmanager
def gc_pauses():
    """Python's garbage collections while the block runs: yields a list that gets (generation, seconds) for
    each one (``gc.callbacks``)."""
    pauses: list[tuple[int, float]] = []
    began = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - began[0]))
    gc.callbacks.append(on_gc)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(on_gc)


def measure(batch: int, steps: int, model_dir: str, repeats: int = 1, *, load_format: str = "auto",
            prompt_len: int = 16, greedy: bool = False, overlap: bool = True, profile: str | None = None,
            final_only: bool = False, served: bool = False, separate_sampler: bool = False,
            gc_freeze: bool = False) -> dict:
    eng = steady_engine(batch, steps * (repeats + bool(profile)), model_dir, load_format=load_format,
                        prompt_len=prompt_len, greedy=greedy, overlap=overlap, final_only=final_only,
                        served=served, separate_sampler=separate_sampler, gc_freeze=gc_freeze)
    if served:     # the step and its message to the server, pickled as the engine process's loop does
        from jaxdyn.engine.process import _dumps

        def step():
            _dumps(("out", [("o", w) for w in eng.step(wire=True)], None))
    else:
        step = eng.step
    runs = []
    with gc_pauses() as collections:
        for _ in range(repeats):
            h0, w0, t0 = eng.host_time, eng.wait_time, time.perf_counter()
            for _ in range(steps):
                step()
            wall = (time.perf_counter() - t0) / steps
            runs.append((((eng.host_time - h0) - (eng.wait_time - w0)) / steps, wall))
    pauses = [sec for _, sec in collections]
    host, wall = sorted(runs)[len(runs) // 2]
    if profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.runcall(lambda: [step() for _ in range(steps)])
        os.makedirs(profile, exist_ok=True)
        path = os.path.join(profile, f"host_{batch}.prof")
        prof.dump_stats(path)
        print(f"## cProfile of {steps} steps at {batch} running ({path})")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    assert len(eng.scheduler.running) == batch, "a request finished or was preempted while timed"
    return dict(batch=batch, host_ms=host * 1e3, wall_ms=wall * 1e3, host_per_req_us=host / batch * 1e6,
                gc_per_step_ms=sum(pauses) / (steps * repeats) * 1e3, gc_count=len(pauses),
                gc_max_ms=max(pauses, default=0.0) * 1e3)


def steady_engine(batch: int, steps: int, model_dir: str, *, load_format: str = "auto", prompt_len: int = 16,
                  greedy: bool = False, overlap: bool = True, final_only: bool = False, served: bool = False,
                  separate_sampler: bool = False, gc_freeze: bool = False):
    """A warmed-up EngineCore with ``batch`` requests in steady decode and room for ``steps`` more steps.
    ``served``: the requests as ``jaxdyn serve``'s engine process gets them (``detokenize=False``: the server
    decodes their text)."""
    from checkpoints.loader import load_model
    from jaxdyn import EngineConfig, EngineCore, SamplingParams

    mesh, loaded, tok = load_model(model_dir, dtype="float32", load_format=load_format)
    tokens = max(256, 2 * batch)
    # Nobody finishes while timed (those admitted first decode while the rest prefill, in what the
    # running ones leave of the token budget).
    max_tokens = steps + 16 + -(-batch * prompt_len // (tokens - batch))
    max_model_len = prompt_len + max_tokens
    # Only the buckets the run uses (prefill chunks, then decode of ``batch``), one page bucket: the
    # warm-up compiles each in every sampler variant, which at 32 layers takes long on the CPU.
    cfg = EngineConfig(num_pages=batch * -(-max_model_len // 16) + 64, page_size=16,
                       max_num_batched_tokens=tokens, max_num_seqs=max(batch, 1),
                       max_model_len=max_model_len, token_buckets=tuple(sorted({batch, tokens})),
                       page_buckets=(-(-max_model_len // 16),), fail_on_compile=True, seed=0,
                       separate_sampler=separate_sampler, gc_freeze=gc_freeze or None,
                       overlap=overlap)
    eng = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, cfg)
    eng.warmup()
    rng = np.random.default_rng(0)
    vocab = min(loaded.config.vocab_size, tok.vocab_size if tok is not None else 1 << 30)
    high = 250 if vocab == 258 else vocab      # the byte tokenizer: bytes only
    for i in range(batch):
        params = (SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                 detokenize=not served) if greedy else
                  SamplingParams(temperature=0.8, top_p=0.95, max_tokens=max_tokens, ignore_eos=True, seed=i,
                                 detokenize=not served))
        eng.add_request(f"r{i}", rng.integers(0, high, prompt_len).tolist(), params, final_only=final_only)
    while eng.scheduler.waiting or any(s.num_computed < len(s.prompt_ids) for s in eng.scheduler.running):
        eng.step()
    for _ in range(5):
        eng.step()
    return eng


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--preset", default=None,
                    help="a preset's depth and vocabulary, word-level tokenizer, hidden 64 (e.g. llama-3.1-8b)")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--greedy", action="store_true", help="greedy requests (default: temperature 0.8, top-p 0.95)")
    ap.add_argument("--no-overlap", action="store_true",
                    help="read each step's tokens before the next dispatch: the host's bookkeeping then runs "
                         "while the CPU device is idle, so it is timed without the device competing for the cores")
    ap.add_argument("--final-only", action="store_true",
                    help="requests as LLM.generate adds them (one output each, when it finishes: no per-step outputs)")
    ap.add_argument("--separate-sampler", action="store_true",
                    help="the engine's separate_sampler: a step is the bucket's forward call, then the sampler's")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="the engine's gc_freeze (on by default on accelerators, off on the CPU): after warm-up the "
                         "collector leaves what loading and compiling made alone")
    ap.add_argument("--served", action="store_true",
                    help="requests and steps as jaxdyn serve's engine process runs them (no detokenization: the "
                         "server decodes the text; outputs as the deltas sent to the server, step(wire=True), "
                         "pickled into its message)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="then profile --steps more steps per batch (cProfile): DIR/host_<batch>.prof, top 25 printed")
    args = ap.parse_args()
    sys.path.insert(0, ".")
    if args.preset is None:
        if args.layers is not None or args.vocab is not None:
            ap.error("--layers and --vocab need --preset")
        from tests.support import make_byte_tokenizer, make_hf_checkpoint
        d = make_hf_checkpoint("llama3.1", tempfile.mkdtemp())
        make_byte_tokenizer(d)
        load_format = "auto"
    else:
        from benchmarks.gpu.suite import model_dir
        overrides = dict(TINY_WIDTH)
        if args.layers is not None:
            overrides["num_hidden_layers"] = args.layers
        if args.vocab is not None:
            overrides["vocab_size"] = args.vocab
        d = model_dir(args.preset, tempfile.mkdtemp(), **overrides)
        load_format = "dummy"
    rows = [measure(b, args.steps, d, args.repeats, load_format=load_format, prompt_len=args.prompt_len,
                    greedy=args.greedy, overlap=not args.no_overlap, profile=args.profile,
                    final_only=args.final_only, served=args.served, separate_sampler=args.separate_sampler,
                    gc_freeze=args.gc_freeze)
            for b in args.batches]
    from jaxdyn.config import ModelConfig
    mc = ModelConfig.from_pretrained(d)
    cmd = "python benchmarks/engine_host_time.py" + (f" --repeats {args.repeats}" if args.repeats > 1 else "")
    if args.steps != 60:
        cmd += f" --steps {args.steps}"
    if args.batches != [1, 64, 256]:
        cmd += " --batches " + " ".join(map(str, args.batches))
    for flag in ("preset", "layers", "vocab"):
        if getattr(args, flag) is not None:
            cmd += f" --{flag} {getattr(args, flag)}"
    if args.prompt_len != 16:
        cmd += f" --prompt-len {args.prompt_len}"
    if args.greedy:
        cmd += " --greedy"
    if args.no_overlap:
        cmd += " --no-overlap"
    if args.final_only:
        cmd += " --final-only"
    if args.served:
        cmd += " --served"
    if args.separate_sampler:
        cmd += " --separate-sampler"
    if args.gc_freeze:
        cmd += " --gc-freeze"
    model = (f"tiny random Llama ({mc.num_layers} layers, hidden {mc.hidden_size}, vocab {mc.vocab_size}, "
             "byte-level tokenizer)" if args.preset is None else
             f"{args.preset}'s depth and vocabulary ({mc.num_layers} layers, vocab {mc.vocab_size}, word-level "
             f"tokenizer), hidden {mc.hidden_size}, random weights")
    lines = [
        f"## Engine host time per step — {datetime.date.today()}",
        "",
        f"Device: CPU ({platform.processor() or platform.machine()}, {jax.device_count()} device), "
        f"jax {jax.__version__}; model: {model}, float32; steady decode, "
        + ("greedy" if args.greedy else "sampling (temperature 0.8, top-p 0.95)")
        + f", prompts of {args.prompt_len} tokens, {'detokenization by the server' if args.served else 'detokenization on'}, overlap {'off' if args.no_overlap else 'on'}"
        + (", final-only requests (as LLM.generate)" if args.final_only else "")
        + (", requests and steps as jaxdyn serve's engine process runs them" if args.served else "")
        + (", the sampler a call of its own (separate_sampler)" if args.separate_sampler else "")
        + (", the heap settled after warm-up (gc_freeze)" if args.gc_freeze else "")
        + (f"; median of {args.repeats} runs of {args.steps} steps." if args.repeats > 1 else "."),
        f"Command: `{cmd}`",
        "",
        "Garbage collection: Python's collections in all the timed steps (every run's, not the median's): ms a "
        "step on average, how many, the longest.",
        "",
        "| running requests | host ms / step | wall ms / step | host / wall | host µs / request | GC ms / step "
        "| GC collections | longest GC ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['host_ms']:.2f} | {r['wall_ms']:.2f} | "
                     f"{r['host_ms'] / r['wall_ms']:.2f} | {r['host_per_req_us']:.1f} | {r['gc_per_step_ms']:.2f} | "
                     f"{r['gc_count']} | {r['gc_max_ms']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
