# Session 47, call 1 (~400 s; carry .gpu_wheels; an H100): why the 8B bf16 engine with default KV pages ran out of
# memory on an H100 in session 46 (at JAX's 0.75 share and at 0.9; 20,480 explicit pages built at 0.9): each build
# from an empty JAX cache, then again from a warm one (if the warm build succeeds, XLA's autotuning at compile time
# takes the memory the default pages' 15 % reserve leaves), with the device's memory stats read after each stage
# (benchmarks.gpu.memory_probe); then the bf16 profile session 46 could not run.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 JAX_TRACEBACK_FILTERING=off
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
for run in cold warm; do
  JAX_COMPILATION_CACHE_DIR=/tmp/jc_default timeout 100 python -m benchmarks.gpu.memory_probe \
    --engine '{"num_pages": null}' 2>&1 | grep -v "^W" | tee $OUT/memory_probe_$run.txt | tail -12
done
# a build that fits (20,480 explicit pages): its peak beyond weights and pages is what the default sizing must leave
JAX_COMPILATION_CACHE_DIR=/tmp/jc_default timeout 100 python -m benchmarks.gpu.memory_probe \
  2>&1 | grep -v "^W" | tee $OUT/memory_probe_20480.txt | tail -12
JAX_COMPILATION_CACHE_DIR=/tmp/jc_bf16 timeout 170 python -m benchmarks.gpu.profile_run \
  --windows 60:63,1000:1003 --hlo 16,2048 --out $OUT/prof 2>&1 | grep -v "^W" | tee $OUT/profile_run_bf16.txt | tail -30
