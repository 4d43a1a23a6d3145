"""The ``jaxdyn`` command line."""

from __future__ import annotations

import argparse
import os
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


def load_model_for_cli(model: str, load_format: str, tp: int, dtype: str | None):
    """Resolve --model (a checkpoint directory or, with --load-format dummy, a preset name)."""
    import jax.numpy as jnp

    from checkpoints.dummy import init_dummy_weights
    from checkpoints.hf import CheckpointError, load_hf_checkpoint
    from jaxdyn.config import ConfigError, ModelConfig
    from jaxdyn.models.presets import PRESETS, preset_config
    from jaxdyn.parallel.sharding import make_mesh

    import jax
    if tp < 1 or tp > len(jax.devices()):
        raise CLIError(f"--tp {tp}: this machine has {len(jax.devices())} device(s)")
    mesh = make_mesh(tp)
    dt = jnp.dtype(dtype) if dtype else None
    try:
        if load_format == "dummy":
            if model in PRESETS:
                cfg = ModelConfig.from_dict(preset_config(model))
            elif os.path.isdir(model):
                cfg = ModelConfig.from_pretrained(model)
            else:
                raise CLIError(f"--model {model!r}: neither a directory nor a preset "
                               f"({', '.join(sorted(PRESETS))})")
            return mesh, init_dummy_weights(cfg, mesh, dtype=dt)
        if not os.path.isdir(model):
            raise CLIError(f"--model {model!r}: no such directory (use --load-format dummy "
                           f"with a preset: {', '.join(sorted(PRESETS))})")
        return mesh, load_hf_checkpoint(model, mesh, dtype=dt)
    except (ConfigError, CheckpointError) as e:
        raise CLIError(str(e)) from None


def cmd_generate(args) -> int:
    from jaxdyn.engine.runner import ModelRunner, RunnerConfig, SequenceWork

    prompt = _parse_ids(args.prompt_ids)
    if args.max_tokens < 1:
        raise CLIError("--max-tokens must be at least 1")
    mesh, loaded = load_model_for_cli(args.model, args.load_format, args.tp, args.dtype)
    cfg = loaded.config
    if any(t < 0 or t >= cfg.vocab_size for t in prompt):
        raise CLIError(f"--prompt-ids: token ids must lie in [0, {cfg.vocab_size})")
    total = len(prompt) + args.max_tokens
    page_size = 16
    pages_needed = -(-total // page_size)
    runner = ModelRunner(loaded.graphdef, loaded.state, mesh, RunnerConfig(
        page_size=page_size, num_pages=pages_needed, max_num_batched_tokens=max(16, len(prompt)),
        max_num_seqs=1, max_model_len=pages_needed * page_size))
    pages = list(range(pages_needed))
    out = runner.step([SequenceWork(prompt, 0, pages)]).next_token_ids.tolist()
    while len(out) < args.max_tokens:
        if out[-1] in cfg.eos_token_ids and not args.ignore_eos:
            break
        nxt = runner.step([SequenceWork([out[-1]], len(prompt) + len(out) - 1, pages)])
        out.append(int(nxt.next_token_ids[0]))
    print(" ".join(map(str, out)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxdyn", description="JAX/XLA-compiled LLM inference server")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="greedy continuation of token ids (offline)")
    g.add_argument("--model", required=True, help="Hugging Face checkpoint directory, or a preset "
                   "name with --load-format dummy")
    g.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights in the model's real shapes")
    g.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    g.add_argument("--max-tokens", type=int, default=16)
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
