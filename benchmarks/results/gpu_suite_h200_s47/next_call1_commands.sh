# Next session, call 1 (~400 s; carry .gpu_wheels; an H100, or an H200 at the share that gives an H100's limit):
# the 8B bf16 engine with default KV pages, which ran out of memory on an H100 in session 46, built with the pages
# now allocated after the weights load and the steps compile (memory_probe: the device's memory after each stage,
# the compiled steps' own needs), from an empty and a warm JAX cache; then the bf16 profile session 46 could not run.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 JAX_TRACEBACK_FILTERING=off
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
share=$(python -c "print(min(0.9, round(0.9 * 81559 / $total, 4)))")      # an H100 80GB HBM3: 81,559 MiB
echo "memory share $share of $total MiB" | tee -a $OUT/device.txt
for run in cold warm; do
  JAX_COMPILATION_CACHE_DIR=/tmp/jc_default timeout 110 python -m benchmarks.gpu.memory_probe \
    --engine "{\"num_pages\": null, \"gpu_memory_utilization\": $share}" 2>&1 | grep -v "^W" \
    | tee $OUT/memory_probe_$run.txt | tail -12
done
JAX_COMPILATION_CACHE_DIR=/tmp/jc_bf16 timeout 170 python -m benchmarks.gpu.profile_run \
  --windows 60:63,1000:1003 --hlo 16,2048 --out $OUT/prof 2>&1 | grep -v "^W" | tee $OUT/profile_run_bf16.txt | tail -30
