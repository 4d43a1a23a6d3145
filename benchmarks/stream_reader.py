"""Host cost of the server's reader thread per engine step (``ProcessEngine``; CPU, no model).

Under ``jaxdyn serve`` the engine runs in its own process and a reader thread of the server unpickles each
step's message and builds every stream's output (``ProcessEngine._handle``); for requests no stop string can
end it also decodes their text (``IncrementalDetokenizer``), which the engine process used to do. That thread
shares the server's interpreter lock with the event loop that frames and writes the SSE chunks and admits new
requests, so its time a step is time the event loop waits. This times it for N streams of one token a step,
with the text decoded by the reader or handed over decoded (as when the engine decodes):

    python -m benchmarks.stream_reader [--streams 1000] [--steps 60] [--preset llama-3.1-8b]

It prints the reader's median ms a step for both, µs a stream, their ratio, and the command. The tokenizer is
the GPU suite's word-level one over the preset's vocabulary (``benchmarks.gpu.suite.model_dir``).
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import statistics
import sys
import tempfile
import time
import types


def measure(tokenizer, num_streams: int, steps: int, reader_decodes: bool, seed: int = 0
            ) -> tuple[float, list[tuple[list[int], str]]]:
    """Median seconds of ``ProcessEngine._handle`` (after unpickling the step's message) per step, and each
    stream's (token ids, text) as the reader accumulated them."""
    import numpy as np

    from jaxdyn import SamplingParams
    from jaxdyn.engine.async_engine import StreamingEngine
    from jaxdyn.engine.process import ProcessEngine, _dumps

    rng = np.random.default_rng(seed)
    vocab = tokenizer.vocab_size
    pe = ProcessEngine.__new__(ProcessEngine)      # the reader's side only: no engine process
    StreamingEngine.__init__(pe, None)
    pe.core = types.SimpleNamespace(tokenizer=tokenizer)
    pe._send = lambda cmd: None

    out: dict = {}

    async def run() -> float:
        for i in range(num_streams):
            pe.add_request(rng.integers(0, vocab, 200).tolist(), SamplingParams(max_tokens=1 << 20), f"r{i}")
            if not reader_decodes:                 # the engine decoded it: the text comes in the message
                pe._streams[f"r{i}"].detok = None
        times = []
        for step in range(steps):
            ids = rng.integers(0, vocab, num_streams).tolist()
            text = [""] * num_streams if reader_decodes else [tokenizer.decode([t]) for t in ids]
            msg = _dumps(("out", [("o", (f"r{i}", False, 0, None, None,
                                         [(0, text[i], [ids[i]], None, None, None, None)], None))
                                  for i in range(num_streams)], None))
            t0 = time.perf_counter()
            _, items, _ = pickle.loads(msg)
            pending: dict = {}
            pe._handle(items, pending)
            times.append(time.perf_counter() - t0)
            if step == steps - 1:          # read once: a copy of every stream's ids kept each step is work
                for its in pending.values():   # (and objects for the garbage collector) a server does not do
                    for _, o in its:
                        out[o.request_id] = (list(o.outputs[0].token_ids), o.outputs[0].text)
        return statistics.median(times)

    median = asyncio.run(run())
    return median, [out[f"r{i}"] for i in range(num_streams)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stream_reader")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--preset", default="llama-3.1-8b", help="the word-level tokenizer over this preset's vocabulary")
    args = ap.parse_args(argv)
    if args.streams < 1 or args.steps < 1:
        ap.error("--streams and --steps must be at least 1")
    from benchmarks.gpu.suite import model_dir
    from jaxdyn.engine.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(model_dir(args.preset, tempfile.mkdtemp()))
    given, _ = measure(tok, args.streams, args.steps, reader_decodes=False)
    decoded, _ = measure(tok, args.streams, args.steps, reader_decodes=True)
    print(f"reader thread, {args.streams} streams, one token each a step (median of {args.steps} steps):")
    print("| text | ms a step | µs a stream |\n|---|---:|---:|")
    print(f"| decoded by the engine | {given * 1e3:.2f} | {given / args.streams * 1e6:.2f} |")
    print(f"| decoded by the reader | {decoded * 1e3:.2f} | {decoded / args.streams * 1e6:.2f} |")
    print(f"ratio {decoded / given:.2f}x")
    print(f"reproduce: python -m benchmarks.stream_reader --streams {args.streams} --steps {args.steps} "
          f"--preset {args.preset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
