"""Where a step's conditionals run on a GPU: inside one of XLA's command buffers (the branch picked on the device by
CUDA graph conditional nodes) or at the top level (a ConditionalThunk: the host reads the branch index and waits
for the stream every step). Reads the thunk sequences an ``--xla_dump_to`` dump holds after XLA's thunk passes
(``*thunk_sequence_after_thunk_passes*.txt``) and prints, per file, its thunks by kind and each line with a
conditional together with the thunk that holds it (the nearest less-indented line above it).

    XLA_FLAGS=--xla_dump_to=/tmp/xdump python -m benchmarks.gpu.profile_run ...
    python -m benchmarks.gpu.thunk_census /tmp/xdump
"""

from __future__ import annotations

import argparse
import glob
import os

KINDS = ("kCommandBuffer", "kMemset32BitValue", "kMemzero", "kCopy", "kConditional", "kCustomCall", "kCubSort",
         "kWhile")


def census(lines: list[str]) -> tuple[dict[str, int], int, list[tuple[int, str, str]]]:
    """Thunks by kind (lines naming each), the lines with a conditional, and for the first 40 of them: its indent,
    its text and the line of the thunk that holds it ("(top level)" when none does)."""
    kinds = {k: sum(k in line for line in lines) for k in KINDS}
    hits = [i for i, line in enumerate(lines) if "onditional" in line]
    held = []
    for i in hits[:40]:
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        parent = next((lines[j].strip()[:100] for j in range(i - 1, -1, -1)
                       if len(lines[j]) - len(lines[j].lstrip()) < indent), "(top level)")
        held.append((indent, line.strip()[:100], parent))
    return kinds, len(hits), held


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump", help="the --xla_dump_to directory")
    args = ap.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.dump, "*thunk_sequence_after_thunk_passes*.txt")))
    print(f"{len(files)} thunk sequences after the thunk passes")
    for f in files:
        lines = open(f).read().splitlines()
        kinds, count, held = census(lines)
        print(f"== {os.path.basename(f)}: {len(lines)} lines, {count} with a conditional; thunks by kind {kinds}")
        for indent, text, parent in held:
            print(f"  indent {indent}: {text}  <- in: {parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
