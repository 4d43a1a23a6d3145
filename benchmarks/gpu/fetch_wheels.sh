#!/usr/bin/env bash
# Wheels of the Python packages the GPU machines' image lacks, for Python 3.12 on manylinux x86_64,
# into .gpu_wheels/ (git-ignored; a device call takes it as carry: [".gpu_wheels"]). Run here, where pip
# reaches a registry; nothing on the GPU machine installs from the network:
#
#     bash benchmarks/gpu/fetch_wheels.sh
#     # on the GPU machine:
#     pip install --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps && PYTHONPATH=$PWD:/tmp/pydeps python -m benchmarks.gpu.gpu --out $OUT/gpu
#
# The image ('cuda', package list of 2026-11-17 in the device tool's KINDS.md) already has h11, click,
# httpx, httpcore, certifi, idna, jinja2, markupsafe, prometheus-client, tokenizers, safetensors, tqdm,
# orbax-checkpoint, flax, jax 0.11.2: those are not fetched (a second copy would shadow the image's).
# Missing there: the server stack (starlette, uvicorn) and pydantic with its own needs. anyio and
# typing-extensions come too: the image's versions are not listed, and these (the ones CI tests with here)
# meet starlette's and pydantic's floors; both are backward compatible. pydantic-core must be the one this
# pydantic pins. Keep the total under ~40 MiB (the device call's 64 MiB carry limit is shared with the
# working tree).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.gpu_wheels
WHEELS=(
    starlette==1.10.0          # serving/app.py
    uvicorn==0.54.0            # jaxdyn serve (needs click, h11: in the image)
    uvloop==0.23.0             # uvicorn's event loop (a jaxdyn dependency)
    httptools==0.9.0           # uvicorn's HTTP parser (a jaxdyn dependency)
    pydantic==2.13.4           # serving/protocol.py
    pydantic_core==2.46.4      # pydantic's compiled core (cp312 manylinux)
    typing-inspection==0.4.2   # pydantic
    annotated-types==0.7.0     # pydantic
    typing_extensions==4.16.0  # pydantic >= 2.12 needs >= 4.14.1; the image's version is not listed
    sniffio==1.3.1             # older anyio releases import it
    anyio==4.16.0              # starlette needs anyio >= 4 (the image has anyio, version not listed)
)
rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
    echo "fetch_wheels: expected ${#WHEELS[@]} wheels, got $count" >&2
    exit 1
fi
kib=$(du -sk "$DEST" | cut -f1)
ls -l "$DEST"
echo "fetch_wheels: $count wheels, $((kib / 1024)).$(( (kib % 1024) * 10 / 1024 )) MiB in $DEST"
if [ "$kib" -gt $((40 * 1024)) ]; then
    echo "fetch_wheels: over 40 MiB: the device call's carry limit is 64 MiB in all" >&2
    exit 1
fi
