"""A digest of the engine's greedy outputs, to compare two runs' tokens (e.g. under two ``XLA_FLAGS``).

The GPU suite's engine (a preset's shapes, random weights: ``--load-format dummy`` draws them from a fixed seed),
an offline dataset's prompts and output lengths, greedy with ``ignore_eos``. Prints one line: the requests, the
output tokens, and a SHA-256 of every request's output token ids in order; then the first tokens of the first
requests (to see where two runs part).

    python -m benchmarks.gpu.outputs_digest [--model llama-3.1-8b] [--quant fp8] [--engine '{"kv_cache_dtype": "fp8"}']
        [--dataset sharegpt-lengths] [--num-prompts 200]

Two runs whose digests are equal produced the same tokens; run it twice under the same flags first to see
that the engine is deterministic on that machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile


def digest(token_lists: list[list[int]]) -> str:
    """SHA-256 over each request's token ids in order (a request's end marked, so that [1], [2] != [1, 2])."""
    h = hashlib.sha256()
    for ids in token_lists:
        h.update(json.dumps(list(ids)).encode())
        h.update(b";")
    return h.hexdigest()


def compare(path_a: str, path_b: str) -> str:
    """Two ``--out`` files side by side: requests whose tokens are equal, and the largest difference of the
    chosen tokens' logprobs up to each request's first differing token."""
    with open(path_a) as f:
        a = json.load(f)
    with open(path_b) as f:
        b = json.load(f)
    if len(a) != len(b):
        return f"different request counts: {len(a)} against {len(b)}"
    same, worst = 0, 0.0
    for ra, rb in zip(a, b):
        same += ra["tokens"] == rb["tokens"]
        for ta, tb, la, lb in zip(ra["tokens"], rb["tokens"], ra["logprobs"], rb["logprobs"]):
            if ta != tb:
                break
            worst = max(worst, abs(la - lb))
    return f"{same} of {len(a)} requests with equal tokens; largest logprob difference before a token differs {worst:.3g}"


def main(argv=None) -> int:
    from benchmarks.gpu import suite

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.outputs_digest")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--quant", default=None, choices=("fp8", "int8"))
    ap.add_argument("--quantize-lm-head", action="store_true")
    ap.add_argument("--engine", default=None, help="JSON of EngineConfig fields over the suite's")
    ap.add_argument("--dataset", default="sharegpt-lengths")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--show", type=int, default=3, help="print the first 8 tokens of this many requests")
    ap.add_argument("--out", default=None, help="write every request's token ids and their logprobs here (JSON)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                    help="compare two --out files (no engine): tokens equal, largest logprob difference")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return 0
    suite.check_quant_arguments(ap, args)

    from benchmarks.gpu.gpu import ENGINE, engine_with, offline_datasets
    from benchmarks.gpu.suite import _dataset_args, _engine_config, model_dir, quant_overrides
    from jaxdyn import LLM, SamplingParams
    from jaxdyn.engine.llm import build_engine
    from serving.bench import datasets

    engine_cfg = engine_with(ENGINE, json.loads(args.engine) if args.engine else {})
    path = model_dir(args.model, tempfile.mkdtemp(), **quant_overrides(vars(args)))
    llm = LLM(engine=build_engine(path, load_format="dummy", config=_engine_config(engine_cfg)))
    ds = next(d for d in offline_datasets(False, args.num_prompts) if d["dataset"] == args.dataset)
    samples = datasets.load_samples(_dataset_args(ds),
                                    datasets.PromptSource(datasets.seeded_rng(0, 1, 0), llm.tokenizer, None))
    outs = llm.generate([s.prompt for s in samples],
                        [SamplingParams(max_tokens=s.output_len, ignore_eos=True, temperature=0.0, logprobs=0)
                         for s in samples], use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    if args.out:
        with open(args.out, "w") as f:
            json.dump([{"tokens": t, "logprobs": [lp[tok].logprob for tok, lp in zip(t, o.outputs[0].logprobs)]}
                       for t, o in zip(tokens, outs)], f)
    print(f"outputs digest: {len(tokens)} requests, {sum(map(len, tokens))} output tokens, sha256 {digest(tokens)}")
    for i, t in enumerate(tokens[:args.show]):
        print(f"  request {i}: {t[:8]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
