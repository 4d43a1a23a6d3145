"""``jaxdyn bench offline``: the engine without HTTP (``LLM.generate``) on the ``bench serve`` datasets.

The engine is built and warmed up (every bucket compiled) before the clock
starts; ``--num-warmups`` prompts then run once untimed, and the prefix cache is
emptied after them (the timed run finds none of their KV). All prompts are added
at once and the engine runs until the last finishes (a multi-turn dataset runs
turn by turn: each turn's prompt is the conversation so far, token ids of the
earlier prompts and the actual replies, plus the new message). Reports
requests/s and input/output tokens/s.

    jaxdyn bench offline --model checkpoints/demo --random-input-len 128 --random-output-len 64 --num-prompts 200
"""

from __future__ import annotations

import datetime
import time

from serving.bench import BenchError, datasets, report
from serving.bench.datasets import PromptSource, Sample


def _params(samples: list[Sample], ignore_eos: bool, sampling: dict):
    """Each sample's SamplingParams: its output length, and ``sampling`` (temperature, top_p, top_k)."""
    from jaxdyn import SamplingParams
    return [SamplingParams(max_tokens=s.output_len, ignore_eos=ignore_eos, **sampling) for s in samples]


def _generate(llm, prompts, params, progress: bool, desc: str):
    from jaxdyn import RequestError
    try:
        return llm.generate(prompts, params, use_tqdm=progress)
    except (RequestError, ValueError) as e:
        raise BenchError(f"{desc}: the engine refused a prompt: {e}") from None


def benchmark(llm, samples: list[Sample], *, ignore_eos: bool = True, temperature: float = 0.0, top_p: float = 1.0,
              top_k: int = 0, num_warmups: int = 0, progress: bool = True, on_start=None) -> dict:
    """Generate every sample; returns the summary (and ``requests``: prompt and output tokens of each).
    ``temperature``, ``top_p``, ``top_k``: every request's sampling (vLLM's benchmark flags).
    ``on_start``: called after the warm-up requests, as the timed run starts."""
    tok = llm.tokenizer
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
    if num_warmups:
        firsts = [s for s in samples if s.turn == 0][:num_warmups]
        _generate(llm, [s.prompt for s in firsts], _params(firsts, ignore_eos, sampling), False, "warm-up")
        if hasattr(llm.engine, "reset_prefix_cache"):
            llm.engine.reset_prefix_cache()     # the warm-up prompts are the run's first: none of it is a cache hit
    records: list[tuple[int, int]] = []
    if on_start is not None:
        on_start()
    start = time.perf_counter()
    if samples[0].conversation is None:
        outs = _generate(llm, [s.prompt for s in samples], _params(samples, ignore_eos, sampling),
                         progress, "generate")
        records = [(len(o.prompt_token_ids), len(o.outputs[0].token_ids)) for o in outs]
    else:
        history: dict[int, list[int]] = {}          # conversation -> its token ids so far
        for turn in range(max(s.turn for s in samples) + 1):
            batch = [s for s in samples if s.turn == turn]
            prompts = []
            for s in batch:
                ids = s.prompt if isinstance(s.prompt, list) else tok.encode(s.prompt, add_special_tokens=turn == 0)
                prompts.append(history.get(s.conversation, []) + ids)
            outs = _generate(llm, prompts, _params(batch, ignore_eos, sampling), progress, f"turn {turn}")
            for s, o in zip(batch, outs):
                history[s.conversation] = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
                records.append((len(o.prompt_token_ids), len(o.outputs[0].token_ids)))
    duration = time.perf_counter() - start
    total_in = sum(p for p, _ in records)
    total_out = sum(o for _, o in records)
    return {"requests": len(records), "duration_s": duration, "total_input_tokens": total_in,
            "total_output_tokens": total_out, "request_throughput": len(records) / duration,
            "input_throughput": total_in / duration, "output_throughput": total_out / duration,
            "total_token_throughput": (total_in + total_out) / duration,
            "per_request": [{"prompt_tokens": p, "output_tokens": o} for p, o in records]}


def add_sampling_arguments(p) -> None:
    """Every request's sampling: --temperature, --top-p, --top-k (as vLLM's benchmarks take them)."""
    p.add_argument("--temperature", type=float, default=0.0, help="every request's temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="every request's top_p (1: off; applies with --temperature > 0 only, as in vLLM)")
    p.add_argument("--top-k", type=int, default=0,
                   help="every request's top_k (0 or -1: off; applies with --temperature > 0 only, as in vLLM)")


def check_sampling_arguments(args) -> None:
    """BenchError naming a sampling flag out of range."""
    if not 0 <= args.temperature <= 100:        # SamplingParams' range (a NaN fails it too)
        raise BenchError(f"--temperature must be in [0, 100], got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise BenchError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < -1:
        raise BenchError(f"--top-k must be -1, 0 or a positive integer, got {args.top_k}")


def add_arguments(p) -> None:
    """The flags besides the engine's (whose --seed also seeds the prompts)."""
    datasets.add_arguments(p, seed=False)
    add_sampling_arguments(p)
    p.add_argument("--num-warmups", type=int, default=0, help="prompts generated once, untimed, first")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def run(args, model: str, engine_config) -> dict:
    """Build the engine for ``model``, generate the dataset, print the table; returns the JSON document."""
    import dataclasses

    from checkpoints.hf import CheckpointError
    from jaxdyn import LLM
    from jaxdyn.engine.llm import build_engine

    datasets.check_arguments(args)
    if args.num_warmups < 0:
        raise BenchError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    check_sampling_arguments(args)
    if args.out:
        report.check_writable(args.out)
    try:
        engine = build_engine(model, tp=args.tp, dtype=args.dtype, load_format=args.load_format,
                              config=engine_config, warmup=False, quantization=args.quantization,
                              quantize_lm_head=args.quantize_lm_head)
    except (CheckpointError, ValueError) as e:
        raise BenchError(str(e)) from None
    llm = LLM(engine=engine)
    vocab = None if llm.tokenizer is not None else engine.model_config.vocab_size
    seed = args.seed if args.seed is not None else 0
    source = PromptSource(datasets.seeded_rng(seed, 1, 0), llm.tokenizer, vocab)
    samples = datasets.load_samples(args, source)
    if samples[0].conversation is None:
        longest = max(s.prompt_len or 0 for s in samples) + max(s.output_len for s in samples)
    else:   # the last turn carries the whole conversation
        longest = 1 + (max(s.turn for s in samples) + 1) * (args.turn_len + samples[0].output_len)
    if longest > engine.max_model_len:
        raise BenchError(f"the longest prompt + output is {longest} tokens, over the engine's max_model_len "
                         f"{engine.max_model_len} (raise --max-model-len or shorten the dataset)")
    engine.load_info["warmup_seconds"] = engine.warmup(not args.disable_tqdm)   # compile every bucket
    summary = benchmark(llm, samples, ignore_eos=args.ignore_eos, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, num_warmups=args.num_warmups, progress=not args.disable_tqdm)
    per_request = summary.pop("per_request")
    cfg = {k: getattr(args, k) for k in ("dataset", "dataset_path", "sharegpt_replies", "num_prompts", "seed",
                                         "input_len", "output_len", "range_ratio", "ignore_eos", "temperature",
                                         "top_p", "top_k", "num_warmups", "tp", "dtype", "load_format",
                                         "quantization", "quantize_lm_head")}
    # every engine setting (what the command line set and the defaults it left), and the command itself
    engine_fields = {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                     for k, v in dataclasses.asdict(engine_config).items()}
    cfg.update(seed=seed, model=model, command=report.command_line(args), engine=engine_fields,
               max_model_len=engine.max_model_len, num_pages=engine.num_pages,
               load_seconds=engine.load_info.get("seconds"), warmup_seconds=engine.load_info.get("warmup_seconds"))
    for k, v in (("prefix", ("prefix_len", "suffix_len", "num_prefixes")), ("multiturn", ("num_turns", "turn_len"))):
        if args.dataset == k:
            cfg.update({name: getattr(args, name) for name in v})
    doc = {"benchmark": "jaxdyn bench offline", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "config": cfg, "summary": summary, "requests": per_request}
    print(report.table(doc))
    print(f"command: {cfg['command']}")
    if args.out:
        report.write_json(doc, args.out)
        print(f"wrote {args.out}")
    return doc
