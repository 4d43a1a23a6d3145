#!/usr/bin/env bash
# Kernel and decode-step diagnostics in one device call (about 8 minutes on one H100/H200):
# the GPU kernel tests, the kernel benchmark at chosen points with its block-size sweeps, Nsight
# Compute on the decode kernel for both key gathers, the kernel's PTX, and a profiled 8B decode
# step (kernel time by name, idle gaps between kernels, the Perfetto traces). From the repository
# root on the GPU machine:
#
#     bash benchmarks/gpu/kernel_probe.sh OUT_DIR [POINTS]
#
# OUT_DIR receives at most 8 files (the device tool's limit): pytest.log, kernels.md, ncu.txt,
# ptx.tgz, profile.txt and the traces.
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

stamp "ncu on the decode kernel, b64 c2048"
ncu_bin="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)"
for gather in pages rows; do
    echo "### gather=$gather" >> "$out/ncu.txt"
    timeout 60 "$ncu_bin" --clock-control none -k regex:decode --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section Occupancy --section LaunchStats --section SchedulerStats \
        $py -m benchmarks.gpu.kernel_once --kernel decode --batch 64 --context 2048 --gather $gather \
        >> "$out/ncu.txt" 2>&1
done
tail -5 "$out/ncu.txt"

stamp "PTX of the decode and prefill kernels"
for gather in pages rows; do
    XLA_FLAGS="--xla_dump_to=/tmp/dump_decode_$gather" timeout 60 $py -m benchmarks.gpu.kernel_once \
        --kernel decode --batch 64 --context 2048 --gather $gather --calls 1 > /dev/null 2>&1
    XLA_FLAGS="--xla_dump_to=/tmp/dump_prefill_$gather" timeout 60 $py -m benchmarks.gpu.kernel_once \
        --kernel prefill --batch 1 --context 2048 --gather $gather --calls 1 > /dev/null 2>&1
done
(cd /tmp && find dump_* -name '*.ptx' | tar czf "$out/ptx.tgz" -T -)
ls -la "$out/ptx.tgz"

stamp "profiled 8B decode steps"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 170 $py -m benchmarks.gpu.profile_step --model llama-3.1-8b \
    --points 8x2048,64x2048 --steps 5 --top 16 --trace-out /tmp/traces > "$out/profile.txt" 2>&1
tail -60 "$out/profile.txt"
for f in /tmp/traces/*b64*.gz /tmp/traces/*b8_*.gz; do [ -f "$f" ] && cp "$f" "$out/"; done
stamp "done"
cat "$out/kernels.md" 2>/dev/null | grep -A 40 "^### Decode$" | head -30
