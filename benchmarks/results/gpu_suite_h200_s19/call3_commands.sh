# Nineteenth session, call 3: the decode kernel over fp8 pages is held to 3 blocks a multiprocessor by its 150
# registers a thread (call 2's ncu: 18.75 % occupancy, DRAM 50 %, against bf16 pages' 96 registers, 31 %, 86 %):
# a sweep of warps, stages and block sizes at 768 x 304, 256 x 512 and 256 x 2048, and ncu's occupancy of two
# candidates. Then the default's cold start with 16 compiling threads against 8 (each from an empty cache).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
timeout 200 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-variants 8:4:3:264:rows,4:4:3:264:rows,4:4:5:264:rows,4:4:6:264:rows,8:4:4:264:rows,8:4:5:264:rows,4:8:3:264:rows,4:8:5:264:rows,8:8:4:264:rows,2:4:6:264:rows,2:2:6:264:rows --sweep-points 768x304,256x512,256x2048 --points 768x304 --out $OUT/kernels_fp8.md 2>&1 | grep -v "^W" | tail -2
grep "^|" $OUT/kernels_fp8.md
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
for b in 4:8:5 4:4:6; do
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 90 $NCU --clock-control none --kernel-name regex:paged_decode --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
    python -m benchmarks.gpu.ncu_decode --batch 768 --context 304 --kv-dtype fp8 --blocks $b > $OUT/ncu_fp8_${b//:/-}.txt 2>&1
  echo "== fp8 $b rc=$?"; grep -E "Duration|DRAM Throughput|Registers Per|Dynamic Shared|Theoretical Occ|Issued Warp" $OUT/ncu_fp8_${b//:/-}.txt
done
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
timeout 300 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 150 --configs '[{"quant": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/c1"}}, {"quant": "fp8", "warmup_threads": 16, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/c2"}}]' 2>&1 | grep -v "^W" | tee $OUT/ab_threads.txt | tail -8
