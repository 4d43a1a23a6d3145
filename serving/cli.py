"""The ``jaxdyn`` command line."""

from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """A problem with the command line or its inputs; printed as one line, exit status 2."""


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise CLIError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise CLIError("--prompt-ids: empty prompt")
    return ids


def cmd_generate(args) -> int:
    from checkpoints.hf import CheckpointError
    from jaxdyn import EngineConfig, LLM, RequestError, SamplingParams
    from jaxdyn.engine.llm import build_engine
    from jaxdyn.engine.sampling_params import SamplingParamsError

    if (args.prompt is None) == (args.prompt_ids is None):
        raise CLIError("give exactly one of --prompt and --prompt-ids")
    prompt = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else args.prompt
    if args.prompt is not None and not args.prompt:
        raise CLIError("--prompt: empty prompt")
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    except SamplingParamsError as e:
        raise CLIError(f"--{e.param.replace('_', '-')}: {str(e).split(': ', 1)[1]}") from None
    try:
        engine = build_engine(args.model, tp=args.tp, dtype=args.dtype, load_format=args.load_format,
                              config=EngineConfig(max_num_seqs=1, max_num_batched_tokens=256,
                                                  max_model_len=args.max_model_len),
                              warmup=False)     # one request: compile only the shapes it uses
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    llm = LLM(engine=engine)
    if isinstance(prompt, str) and llm.tokenizer is None:
        raise CLIError(f"--prompt: {args.model} has no tokenizer; use --prompt-ids")
    try:
        out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    except RequestError as e:
        raise CLIError(f"--prompt{'-ids' if args.prompt_ids else ''}: {e}") from None
    if args.prompt_ids is not None:
        print(" ".join(map(str, out.token_ids)))
    else:
        print(out.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxdyn", description="JAX/XLA-compiled LLM inference server")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a continuation offline")
    g.add_argument("--model", required=True, help="Hugging Face checkpoint directory, or a preset "
                   "name with --load-format dummy")
    g.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights in the model's real shapes")
    g.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    g.add_argument("--prompt-ids", help="comma-separated token ids; prints token ids")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"jaxdyn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
