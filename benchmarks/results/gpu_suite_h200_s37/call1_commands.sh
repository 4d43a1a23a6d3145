# Session 37, call 1 (~480 s; in this order: GPU tests, the A/B, the quantization sweep; carry .gpu_wheels and .ab_trees/s36 = `git archive 89b0a03`, session 36's end):
# session 36's unrun GPU tests (the rewritten split merge kernel, the rope kernel in the jitted model); the MLP
# input's quantization kernel over two-loop tiles of several rows and over persistent programs that keep the
# channels' scales in registers (fp8_matmul_probe's ROWS/WARPS/1p|2l|pN/COLS/STAGES configurations); then the default
# (prompts queued in slices, the engine stepping between them) against session 36's end, and with the prefill
# kernel's programs persistent (prefill_programs 1056), two rounds each, own caches.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 100 python -m pytest -m gpu -p no:cacheprovider -rA -v tests/jaxdyn/test_fused_rope_kv.py \
  tests/pallas_kernels/test_rope_kv.py tests/pallas_kernels/test_kernels.py \
  -k "rope or skip_idle or (match_reference_in_bf16 and in_place) or attention_programs" 2>&1 \
  | grep -v "^W" | tail -60 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|Error|PASSED" $OUT/gpu_tests.txt | tail -30
timeout 260 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 110 --configs '[
  {"tree": ".ab_trees/s36", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "prefill_programs": 1056, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_c"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_queue.txt | grep -v "^|" | grep "tok/s\|compiled\|rror" | cut -c1-330
timeout 90 python -m benchmarks.gpu.fp8_matmul_probe --quantize-only --quantize-rows 768,2048 --quantize-inputs raw \
  --quantize-configs 1/16,1/16/p132,1/16/p132/auto/2,1/16/p132/auto/3,1/32/p132,1/8/p264/auto/2,2/4/2l/1024/2,4/8/2l/1024/2,4/8/2l/1024/3,8/8/2l/512/2 \
  --reps 5 2>&1 | grep -v "^W" | tee $OUT/quantize_probe.txt | cut -c1-600
