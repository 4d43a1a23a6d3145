# Next session, call 1 (~340 s; carry .gpu_wheels; an H100 for the anchors' like-for-like figure): the prefill split
# on long prompts' chunks (a chunk's few items each loop over many key blocks, where session 45's ShareGPT-shaped
# steps had many short items and the split lost), then the suite engine offline in bf16 (like for like with the
# anchors, bf16 on an H100; last measured in session ~20: 11,310) beside fp8 w8a8 + fp8 KV, two rounds each.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 120 python -m benchmarks.gpu.prefill_probe --reps 5 \
  --long 2048@2048,2048@4096,2048@8192,2048@16384,1024@16384+1024@1024,512@32768+1536@1536 \
  --variants 128:4:4:3:1056,128:4:4:3:1056:16,128:4:4:3:1056:32,128:4:4:3:1056:64 \
  2>&1 | grep -v "^W" | tee $OUT/prefill_probe_long.txt | tail -14
timeout 300 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 100 --configs "[
  {\"env\": {\"JAX_COMPILATION_CACHE_DIR\": \"/tmp/jc_bf16\"}},
  {\"quant\": \"fp8\", \"kv_cache_dtype\": \"fp8\", \"env\": {\"JAX_COMPILATION_CACHE_DIR\": \"/tmp/jc_fp8\"}}]" \
  2>&1 | grep -v "^W" | tee $OUT/ab_bf16_fp8.txt | grep -v "^|" | grep "tok/s\|rror" | cut -c1-300
grep "^|" $OUT/ab_bf16_fp8.txt | cut -c1-400
