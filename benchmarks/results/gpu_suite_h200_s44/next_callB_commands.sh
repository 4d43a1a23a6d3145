# Next session, call B (~480 s; carry .gpu_wheels; the machine of call A held warm): offline A/B (8B shape, fp8
# w8a8, fp8 KV, 1,000 ShareGPT-shaped prompts): the suite engine against it with the prefill split at the probe's
# best part size (edit SPLIT below to it; 4 if call A could not tell), four rounds each, each from its own cache.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
SPLIT=4
timeout 470 python -m benchmarks.gpu.ab_offline --rounds 4 --timeout-s 100 --configs "[
  {\"quant\": \"fp8\", \"kv_cache_dtype\": \"fp8\", \"env\": {\"JAX_COMPILATION_CACHE_DIR\": \"/tmp/jc_a\"}},
  {\"quant\": \"fp8\", \"kv_cache_dtype\": \"fp8\", \"prefill_split_blocks\": $SPLIT, \"env\": {\"JAX_COMPILATION_CACHE_DIR\": \"/tmp/jc_s\"}}]" \
  2>&1 | grep -v "^W" | tee $OUT/ab_split.txt | grep -v "^|" | grep "tok/s\|rror" | cut -c1-300
grep "^|" $OUT/ab_split.txt | cut -c1-400
