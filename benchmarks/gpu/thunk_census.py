"""Where a step's conditionals run on a GPU: inside one of XLA's command buffers (the branch picked on the device by
CUDA graph conditional nodes) or at the top level (a ConditionalThunk: the host reads the branch index and waits
for the stream every step). Reads the thunk sequences an ``--xla_dump_to`` dump holds after XLA's thunk passes
(``*thunk_sequence_after_thunk_passes*.txt``) and prints, per file, its thunks by kind and each line with a
conditional together with the thunk that holds it (the nearest less-indented line above it).

    XLA_FLAGS=--xla_dump_to=/tmp/xdump python -m benchmarks.gpu.profile_run ...
    python -m benchmarks.gpu.thunk_census /tmp/xdump

It also prints the command-buffer kinds XLA enables by default in this jaxlib (``default_command_buffer_kinds``):
a conditional is recorded into a CUDA graph only where CONDITIONAL is among them.
"""

from __future__ import annotations

import argparse
import glob
import os

# xla.proto's CommandBufferCmdType values (10 is reserved: the removed DYNAMIC_SLICE_COPY_FUSION)
COMMAND_BUFFER_KINDS = {1: "FUSION", 2: "CUBLAS", 3: "CUDNN", 4: "COLLECTIVES", 5: "CONDITIONAL", 6: "WHILE",
                        7: "CUSTOM_CALL", 8: "CUBLASLT", 9: "DYNAMIC_SLICE_FUSION", 11: "CONVOLUTION"}
_BUILD_OPTIONS, _DEBUG_OPTIONS, _ENABLE_COMMAND_BUFFER = 3, 3, 258    # the proto fields down to the kinds


def _varint(b: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        c = b[i]
        i += 1
        value |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return value, i


def _fields(b: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of a serialized protobuf message, in order (no schema needed)."""
    i, out = 0, []
    while i < len(b):
        key, i = _varint(b, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(b, i)
        elif wire == 2:
            n, i = _varint(b, i)
            value, i = b[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = b[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire} not expected in CompileOptionsProto")
        out.append((number, wire, value))
    return out


def default_command_buffer_kinds() -> list[str]:
    """The kinds of ``xla_gpu_enable_command_buffer`` a compilation gets in this process (XLA's defaults as
    ``XLA_FLAGS`` leaves them), read from the serialized ``CompileOptions`` (jaxlib exposes no accessor for the
    field): every jaxlib carries XLA's GPU debug-option defaults, so this answers on a CPU too."""
    from jax._src.lib import xla_client

    def sub(b, number):
        return next(v for n, w, v in _fields(b) if n == number and w == 2)

    debug = sub(sub(xla_client.CompileOptions().SerializeAsString(), _BUILD_OPTIONS), _DEBUG_OPTIONS)
    values: list[int] = []
    for n, w, v in _fields(debug):
        if n == _ENABLE_COMMAND_BUFFER:
            if w == 2:        # packed
                i = 0
                while i < len(v):
                    x, i = _varint(v, i)
                    values.append(x)
            else:
                values.append(v)
    return [COMMAND_BUFFER_KINDS.get(x, f"kind {x}") for x in values]


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
    print(f"XLA's command-buffer kinds in this process: {','.join(default_command_buffer_kinds()) or '(none)'}")
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
