# Nineteenth session, call 2: Nsight Compute on the decode kernel at 768 x 304 (bf16 pages; fp8 pages with their
# 8-page blocks and with bf16's 4-page blocks): why fp8 pages take bf16's time for half the bytes. Then the A/B of
# the sampler apart against one executable (fresh logits since 22a7e90) on this machine.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1); echo "ncu: $NCU"
for v in "bf16 4:4:3" "fp8 8:4:3" "fp8 4:4:3"; do set -- $v
  timeout 120 $NCU --clock-control none --kernel-name regex:paged_decode --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SchedulerStats --section SourceCounters \
    python -m benchmarks.gpu.ncu_decode --batch 768 --context 304 --kv-dtype $1 --blocks $2 > $OUT/ncu_$1_${2//:/-}.txt 2>&1
  echo "== $1 $2 rc=$?"; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Shared Memory Config|Dynamic Shared|Block Limit|Warp Cycles Per Issued|Issued Warp|No Eligible|Theoretical Occ" $OUT/ncu_$1_${2//:/-}.txt | head -20
done
unset XLA_PYTHON_CLIENT_PREALLOCATE
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 170 --configs '[{"quant": "fp8"}, {"quant": "fp8", "separate_sampler": true}]' 2>&1 | grep -v "^W" | tee $OUT/ab_split.txt | tail -10
