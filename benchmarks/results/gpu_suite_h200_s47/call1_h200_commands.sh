# Session 47, call 1 on an H200 (H100 starts refused): call1_commands.sh with the memory share set so JAX's limit
# matches an H100's at 0.9 (71.26 GiB: 0.9 of 81,559 MiB), so the default pages come out as on an H100.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 JAX_TRACEBACK_FILTERING=off
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
share=$(python -c "print(round(0.9 * 81559 / $total, 4))")
echo "share $share of $total MiB" | tee -a $OUT/device.txt
for run in cold warm; do
  JAX_COMPILATION_CACHE_DIR=/tmp/jc_default timeout 100 python -m benchmarks.gpu.memory_probe \
    --engine "{\"num_pages\": null, \"gpu_memory_utilization\": $share}" 2>&1 | grep -v "^W" | tee $OUT/memory_probe_$run.txt | tail -12
done
JAX_COMPILATION_CACHE_DIR=/tmp/jc_default timeout 100 python -m benchmarks.gpu.memory_probe \
  --engine "{\"gpu_memory_utilization\": $share}" 2>&1 | grep -v "^W" | tee $OUT/memory_probe_20480.txt | tail -12
JAX_COMPILATION_CACHE_DIR=/tmp/jc_bf16 timeout 170 python -m benchmarks.gpu.profile_run \
  --windows 60:63,1000:1003 --hlo 16,2048 --out $OUT/prof 2>&1 | grep -v "^W" | tee $OUT/profile_run_bf16.txt | tail -30
