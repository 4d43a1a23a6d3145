# Session 38, call 2 (~100 s; carry .gpu_wheels; the ~300 s of device time left): the suite engine as it now is
# (seq_buckets [[2048, 512]], prefill_programs 1056) end to end on 100 prompts, twice (cold, then warm), each
# printing the warm-up's step costs as now timed (round by round after an untimed round of every bucket).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=/tmp/jc JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
for i in 1 2; do
  timeout 120 python -m benchmarks.gpu.profile_run --quant fp8 --engine '{"kv_cache_dtype": "fp8"}' --windows none \
    --num-prompts 100 2>&1 | grep -v "^W" | tee -a $OUT/costs.txt | grep "step costs\|compiled\|rror" | cut -c1-400
done
