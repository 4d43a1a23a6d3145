"""The decode kernel's PTX, variant by variant: what XLA's Triton pipeline made of it (GPU only).

Each variant (``benchmarks.kernels --sweep-variants``' P:W:S:T:G[:F]) is compiled at one shape with XLA's dump
on; the ``paged_decode_attention`` kernel's PTX is cut out of the module's, written to ``--out`` and its
instructions counted by kind: global loads (cp.async: pipelined into shared memory; ld.global: into
registers), shared-memory traffic (ld/st.shared, ldmatrix), conversions (cvt) and tensor-core products (mma).

    python -m benchmarks.gpu.decode_ptx --out DIR [--kv-dtype fp8] [--variants 8:4:3:264:rows,8:4:3:264:rows:qk]
        [--batch 64 --context 512]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

KINDS = (("cp.async", r"\bcp\.async\.(?:ca|cg)"), ("ld.global", r"\bld\.global"), ("ld.shared", r"\bld\.shared"),
         ("st.shared", r"\bst\.shared"), ("ldmatrix", r"\bldmatrix"), ("cvt fp8", r"\bcvt\.[a-z0-9.]*e4m3"),
         ("cvt other", r"\bcvt\.(?![a-z0-9.]*e4m3)"), ("mma", r"\bmma\.sync"), ("wgmma", r"\bwgmma\.mma_async"),
         ("bar.sync", r"\bbar\.sync|\bbarrier\.sync"), ("ex2", r"\bex2\."), ("shfl", r"\bshfl\."))


def kernel_ptx(ptx: str, name: str = "paged_decode_attention") -> str:
    """The ``.entry`` of ``ptx`` whose name holds ``name``, through its closing brace ('' if absent)."""
    m = re.search(r"\.visible \.entry [^(]*" + re.escape(name) + r"[^(]*\(", ptx)
    if not m:
        return ""
    depth, i = 0, ptx.index("{", m.end())
    for j in range(i, len(ptx)):
        depth += {"{": 1, "}": -1}.get(ptx[j], 0)
        if depth == 0:
            return ptx[m.start():j + 1]
    return ptx[m.start():]


def count(ptx: str) -> dict[str, int]:
    return {kind: len(re.findall(pat, ptx)) for kind, pat in KINDS}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.decode_ptx")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="fp8")
    ap.add_argument("--variants", default="8:4:3:264:rows,8:4:3:264:rows:qk,8:4:3:264:rows:all")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for spec in args.variants.split(","):
        dump = tempfile.mkdtemp(prefix="ptx_")
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip())
        code = ("import sys, jax, jax.numpy as jnp\n"
                "from pallas_kernels import paged_decode as p\n"
                "P, W, S, T, G, *F = sys.argv[1].split(':')\n"
                "b = p.DecodeBlockSizes(int(P), int(W), int(S), int(T), gather=G, fp8_products=F[0] if F else 'none')\n"
                f"dt = jnp.float8_e4m3fn if {args.kv_dtype!r} == 'fp8' else jnp.bfloat16\n"
                f"B, C = {args.batch}, {args.context}\n"
                "pages = B * C // 16\n"
                "k = jnp.zeros((8, pages, 16, 128), dt); v = jnp.zeros((8, pages, 16, 128), dt)\n"
                "q = jnp.zeros((B, 32, 128), jnp.bfloat16); lens = jnp.full((B,), C, jnp.int32)\n"
                "pt = jnp.arange(pages, dtype=jnp.int32).reshape(B, -1)\n"
                "p.paged_decode_attention_kernel(q, k, v, lens, pt, sm_scale=0.088, blocks=b).block_until_ready()\n")
        r = subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True, text=True)
        if r.returncode:
            print(f"{spec}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        found = ""
        for f in glob.glob(os.path.join(dump, "*.ptx")):
            found = kernel_ptx(open(f).read()) or found
        if not found:
            print(f"{spec}: no paged_decode_attention entry in {len(glob.glob(os.path.join(dump, '*.ptx')))} PTX files")
            continue
        name = spec.replace(":", "_")
        with open(os.path.join(args.out, f"decode_{args.kv_dtype}_{name}.ptx"), "w") as f:
            f.write(found)
        c = count(found)
        c["lines"] = found.count("\n")
        rows.append((spec, c))
    keys = [k for k, _ in KINDS] + ["lines"]
    print(f"decode kernel PTX ({args.kv_dtype} pages, batch {args.batch}, context {args.context}): instruction counts")
    print("| variant | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for spec, c in rows:
        print(f"| {spec} | " + " | ".join(str(c[k]) for k in keys) + " |")
    print(f"reproduce: python -m benchmarks.gpu.decode_ptx --out {args.out} --kv-dtype {args.kv_dtype} "
          f"--variants {args.variants} --batch {args.batch} --context {args.context}")


if __name__ == "__main__":
    main()
