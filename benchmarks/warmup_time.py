"""Warm-up seconds of an engine on this machine: every bucket compiled, no executable or JAX cache.

    python benchmarks/warmup_time.py [--separate-sampler [except-greedy] | --sampler-switch [plain-full|off]]      # the shipped demo
    python benchmarks/warmup_time.py --preset llama-3.1-8b --layers 32 [--separate-sampler [except-greedy] | --sampler-switch [plain-full|off]]
        [--no-nested-layers]

``--preset``: that preset's depth and vocabulary at hidden 64 (``benchmarks/engine_host_time.py``'s narrow model,
random weights), token buckets 16/64/256 and page buckets 8/32 (six shapes). Prints the seconds of
``warmup()`` and how many executables it compiled (``--separate-sampler``: a forward a bucket and a sampler a
bucket and variant, against one executable a bucket and variant; ``except-greedy``: the greedy variant's steps
whole, the others' split; ``--sampler-switch``: one executable a bucket, ``plain-full``: greedy's and random's
steps whole, plain's and full's one switched executable; ``--no-nested-layers``: each step traces every layer, ``EngineConfig.nested_layers``
false).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None, help="a preset's depth and vocabulary at hidden 64 (default: the demo)")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    ap.add_argument("--separate-sampler", nargs="?", const="all", default=None, choices=("all", "except-greedy"))
    ap.add_argument("--sampler-switch", nargs="?", const="all", default=None, choices=("all", "plain-full", "off"),
                    help="one executable a bucket, or plain's and full's (EngineConfig.sampler_switch; default: by device)")
    ap.add_argument("--no-nested-layers", action="store_true", help="every layer traced (EngineConfig.nested_layers false)")
    args = ap.parse_args()
    if args.sampler_switch not in (None, "off") and args.separate_sampler:
        ap.error("--sampler-switch and --separate-sampler: pick one")
    sys.path.insert(0, ".")
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    from checkpoints.loader import load_model
    from jaxdyn import EngineConfig, EngineCore
    from jaxdyn.engine.compilation import compilation_count
    from serving.cli import SAMPLER_SWITCH_FLAG, SEPARATE_SAMPLER_FLAG
    if args.preset is None:
        from serving.cli import DEMO_MODEL, _engine_config, build_parser
        argv = ["serve", "--no-executable-cache"] + (["--separate-sampler", args.separate_sampler]
                                                     if args.separate_sampler else []) + (
            ["--sampler-switch", args.sampler_switch] if args.sampler_switch else [])
        cfg = dataclasses.replace(_engine_config(build_parser().parse_args(argv)),
                                  nested_layers=not args.no_nested_layers)
        mesh, loaded, tok = load_model(DEMO_MODEL)
        what = "the demo model, jaxdyn serve's engine"
    else:
        from benchmarks.engine_host_time import TINY_WIDTH
        from benchmarks.gpu.suite import model_dir
        overrides = dict(TINY_WIDTH, **({"num_hidden_layers": args.layers} if args.layers else {}))
        mesh, loaded, tok = load_model(model_dir(args.preset, tempfile.mkdtemp(), **overrides), dtype="float32",
                                       load_format="dummy")
        cfg = EngineConfig(num_pages=512, max_num_batched_tokens=256, max_num_seqs=64, max_model_len=512,
                           token_buckets=(16, 64, 256), page_buckets=(8, 32),
                           separate_sampler=SEPARATE_SAMPLER_FLAG[args.separate_sampler],
                           sampler_switch=SAMPLER_SWITCH_FLAG[args.sampler_switch], nested_layers=not args.no_nested_layers)
        what = f"{args.preset}'s depth and vocabulary ({loaded.config.num_layers} layers), hidden 64"
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, cfg)
    c0, t0 = compilation_count(), time.perf_counter()
    core.warmup()
    print(f"{what}, separate_sampler={args.separate_sampler or 'off'}, sampler_switch={args.sampler_switch or 'by device'}, "
          f"nested_layers={not args.no_nested_layers}: warm-up "
          f"{time.perf_counter() - t0:.1f} s, {compilation_count() - c0} compilations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
