"""Attention calls to read under Nsight Compute (``ncu``): one jit of the decode kernel
(``paged_decode_attention_kernel``, every sequence at ``--context``) or, with ``--prefill``, of the ragged prefill
kernel (``--batch`` chunks of ``--chunk`` tokens after ``--context`` cached ones), over KV pages of a dtype, with
given block sizes, called ``--calls`` times with rotating page tables.

    ncu --clock-control none --kernel-name regex:paged_decode --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python -m benchmarks.gpu.ncu_decode --batch 768 --context 304 --kv-dtype fp8 [--blocks P:W:S]
    ncu ... --kernel-name regex:ragged_prefill ... python -m benchmarks.gpu.ncu_decode --prefill --batch 1 \\
        --context 512 --chunk 2048 --kv-dtype fp8 [--blocks R:P:W:S]

Without ``ncu`` it prints the calls' median wall time (a check that the point runs).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import kernels
from pallas_kernels import paged_decode, ragged_prefill


def _prefill_call(args, blocks):
    """(jit of the prefill kernel, its inputs): ``batch`` chunks of ``chunk`` rows after ``context`` cached tokens."""
    q, k, v, lens, tables, cu = kernels.prefill_inputs(np.random.default_rng(0), 128, args.context, args.chunk,
                                                       args.batch, count=kernels.ROTATE)
    kernel = functools.partial(ragged_prefill.ragged_prefill_attention_kernel, sm_scale=128 ** -0.5,
                               interpret=kernels.INTERPRET, blocks=blocks)
    return jax.jit(lambda q, k, v, lens, table: kernel(q, k, v, lens, table, cu)), (q, k, v, lens, tables)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", action="store_true", help="the ragged prefill kernel instead of the decode kernel")
    ap.add_argument("--batch", type=int, default=768, help="sequences (decode) or chunks (prefill)")
    ap.add_argument("--context", type=int, default=304, help="cached tokens of each sequence (prefill: before its "
                    "chunk)")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill: query tokens of each chunk")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--blocks", default=None, metavar="P:W:S | R:P:W:S",
                    help="decode: pages a block, warps, stages; prefill: query rows, pages a block, warps, stages "
                    "(default: the kernel's table)")
    ap.add_argument("--fp8-products", default="off", choices=paged_decode.FP8_PRODUCTS,
                    help="decode: DecodeBlockSizes.fp8_products (the products on fp8 matrix instructions)")
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args(argv)
    low = 0 if args.prefill else kernels.PAGE
    if args.batch < 1 or args.context < low or args.chunk < 1 or args.calls < 1:
        ap.error(f"--batch >= 1, --context >= {low}, --chunk >= 1 and --calls >= 1")
    blocks = None
    if args.blocks:
        want = "R:P:W:S" if args.prefill else "P:W:S"
        try:
            sizes = [int(x) for x in args.blocks.split(":")]
        except ValueError:
            sizes = []
        if len(sizes) != len(want.split(":")):
            ap.error(f"--blocks: expected {want}, got {args.blocks!r}")
        blocks = (ragged_prefill.PrefillBlockSizes(*sizes) if args.prefill
                  else paged_decode.DecodeBlockSizes(*sizes))
    if args.fp8_products != "off":
        if args.prefill or args.kv_dtype != "fp8":
            ap.error("--fp8-products: the decode kernel over fp8 pages only (--kv-dtype fp8, not --prefill)")
        import dataclasses
        blocks = dataclasses.replace(
            blocks or paged_decode.decode_block_sizes(128, kernels.PAGE, jnp.float8_e4m3fn, args.batch),
            fp8_products=args.fp8_products)
    kernels.KV_DTYPE = jnp.dtype(jnp.float8_e4m3fn if args.kv_dtype == "fp8" else jnp.bfloat16)
    if args.prefill:
        f, (q, k, v, lens, tables) = _prefill_call(args, blocks)
    else:
        q, k, v, lens, tables = kernels._decode_inputs(np.random.default_rng(0), args.batch, args.context, 128)
        f = jax.jit(lambda q, k, v, lens, table: paged_decode.paged_decode_attention_kernel(
            q, k, v, lens, table, sm_scale=128 ** -0.5, blocks=blocks, interpret=kernels.INTERPRET))
    times = []
    for i in range(args.calls):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, k, v, lens, tables[i % tables.shape[0]]))
        times.append(time.perf_counter() - t0)
    what = (f"prefill {args.batch} x {args.chunk} after {args.context}" if args.prefill
            else f"decode {args.batch} x {args.context}")
    print(f"{what}, {args.kv_dtype} pages, blocks {blocks or 'the table'}: "
          f"median call {np.median(times[1:] or times) * 1e6:.0f} us (wall, with dispatch)")


if __name__ == "__main__":
    main()
