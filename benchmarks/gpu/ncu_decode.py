"""Decode attention calls to read under Nsight Compute (``ncu``): one jit of ``paged_decode_attention_kernel``
at a batch x context, KV pages of a dtype and block sizes, called ``--calls`` times with rotating page tables.

    ncu --clock-control none --kernel-name regex:paged_decode --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python -m benchmarks.gpu.ncu_decode --batch 768 --context 304 --kv-dtype fp8 [--blocks P:W:S]

Without ``ncu`` it prints the calls' median wall time (a check that the point runs).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import kernels
from pallas_kernels import paged_decode


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=768)
    ap.add_argument("--context", type=int, default=304)
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--blocks", default=None, metavar="P:W:S",
                    help="pages a block, warps, stages (default: the kernel's table)")
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args(argv)
    if args.batch < 1 or args.context < kernels.PAGE or args.calls < 1:
        ap.error(f"--batch >= 1, --context >= {kernels.PAGE} and --calls >= 1")
    blocks = None
    if args.blocks:
        try:
            p, w, s = (int(x) for x in args.blocks.split(":"))
        except ValueError:
            ap.error(f"--blocks: expected P:W:S, got {args.blocks!r}")
        blocks = paged_decode.DecodeBlockSizes(p, w, s)
    kernels.KV_DTYPE = jnp.dtype(jnp.float8_e4m3fn if args.kv_dtype == "fp8" else jnp.bfloat16)
    q, k, v, lens, tables = kernels._decode_inputs(np.random.default_rng(0), args.batch, args.context, 128)
    f = jax.jit(lambda q, k, v, lens, table: paged_decode.paged_decode_attention_kernel(
        q, k, v, lens, table, sm_scale=128 ** -0.5, blocks=blocks, interpret=kernels.INTERPRET))
    times = []
    for i in range(args.calls):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, k, v, lens, tables[i % tables.shape[0]]))
        times.append(time.perf_counter() - t0)
    print(f"decode {args.batch} x {args.context}, {args.kv_dtype} pages, blocks {blocks or 'the table'}: "
          f"median call {np.median(times[1:] or times) * 1e6:.0f} us (wall, with dispatch)")


if __name__ == "__main__":
    main()
