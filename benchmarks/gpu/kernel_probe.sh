#!/usr/bin/env bash
# Kernel and decode-step diagnostics in one device call (about 6 minutes on one H200): the GPU
# kernel tests, the kernel benchmark at chosen points with its block-size sweeps, and a profiled
# 8B decode step (kernel time by name, idle gaps between kernels, the Perfetto traces). From the
# repository root on the GPU machine:
#
#     bash benchmarks/gpu/kernel_probe.sh OUT_DIR [POINTS]
#
# OUT_DIR receives at most 8 files (the device tool's limit): pytest.log, kernels.md, profile.txt
# and the traces. (Nsight Compute and XLA's dump gave nothing there on 2026-12-02: ncu could not
# replay a kernel beside JAX's preallocated memory, and the dump held no PTX of Pallas kernels.)
set -uo pipefail
out="${1:?usage: kernel_probe.sh OUT_DIR [POINTS]}"
points="${2:-1x2048,8x2048,32x2048,64x2048,128x2048,8x8192,32x8192}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3
stamp() { echo "== $(date +%T) $*"; }

stamp "device"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
$py -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'

stamp "GPU kernel tests"
timeout 150 $py -m pytest -q -m gpu tests/pallas_kernels > "$out/pytest.log" 2>&1
tail -3 "$out/pytest.log"

stamp "kernel benchmark"
timeout 300 $py -m benchmarks.kernels --points "$points" --out "$out/kernels.md" > /tmp/kernels.log 2>&1
tail -4 /tmp/kernels.log

stamp "profiled 8B decode steps"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 170 $py -m benchmarks.gpu.profile_step --model llama-3.1-8b \
    --points 8x2048,64x2048 --steps 5 --top 16 --trace-out /tmp/traces > "$out/profile.txt" 2>&1
tail -60 "$out/profile.txt"
cp /tmp/traces/*.gz "$out/" 2>/dev/null
stamp "done"
cat "$out/kernels.md" 2>/dev/null | grep -A 40 "^### Decode$" | head -30
