# Thirtieth session, call 1 (~520 s at most): the decode kernel's products on the GPU's fp8 matrix instructions
# (DecodeBlockSizes.fp8_products: "qk" the scores from an e4m3 query per row and the fp8 keys as stored, "qk_pv" the
# values' product too) against the widened float16 products, at the run's decode shapes; and Nsight Compute's
# warp states and instruction mix of both at 88 x 640 (does a mid-size call wait on memory or on its own
# instructions?).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 90 python -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_kernels.py -k fp8_products 2>&1 \
  | tail -4 | tee $OUT/gpu_tests.txt
V=2:1:6:264:rows,2:1:6:264:rows:qk,2:1:6:264:rows:qk_pv,4:1:6:264:rows:qk,2:2:6:264:rows:qk,4:2:4:264:rows:qk
V=$V,4:4:3:264:rows:qk,4:4:3:264:rows:qk_pv,2:1:3:264:rows:qk,1:1:8:264:rows:qk
timeout 220 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-variants $V \
  --sweep-points 32x800,88x640,200x500,768x304 --points 1x512 --out $OUT/kernels_fp8_products.md 2>&1 \
  | grep -v "^W" | tail -3
grep "^|" $OUT/kernels_fp8_products.md | head -14
NCU="ncu --clock-control none --kernel-name regex:paged_decode --launch-skip 2 --launch-count 1"
for P in off qk qk_pv; do
  timeout 60 $NCU --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section InstructionStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    python -m benchmarks.gpu.ncu_decode --batch 88 --context 640 --kv-dtype fp8 --fp8-products $P \
    > $OUT/ncu_88x640_$P.txt 2>&1
  grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issued Warp|Executed Ipc|Stall|Warp Cycles Per Issued|Shared Memory Configuration Size|Dynamic Shared" $OUT/ncu_88x640_$P.txt | head -24
  timeout 40 $NCU --metrics sass__inst_executed_per_opcode --print-metric-instances values \
    python -m benchmarks.gpu.ncu_decode --batch 88 --context 640 --kv-dtype fp8 --fp8-products $P \
    > $OUT/ncu_opcodes_88x640_$P.txt 2>&1
  grep -A3 "sass__inst_executed_per_opcode" $OUT/ncu_opcodes_88x640_$P.txt | head -6 | cut -c1-1500
done
