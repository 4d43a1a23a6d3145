# Session 37, call 1 (~560 s; carry .gpu_wheels): session 36's unrun GPU tests (the rewritten split merge kernel,
# the rope kernel in the jitted model), the MLP input's quantization kernel over two-loop tiles of several rows
# and over persistent programs that keep the channel scales in registers (fp8_matmul_probe's ROWS/WARPS/2l|pN/COLS/STAGES
# configurations), then where the default's 2,048- and 16-token steps
# spend their time (profile_run's traced windows and the two steps' optimized HLO).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 130 python -m pytest -m gpu -p no:cacheprovider -rA -v tests/jaxdyn/test_fused_rope_kv.py \
  tests/pallas_kernels/test_rope_kv.py tests/pallas_kernels/test_kernels.py \
  -k "rope or skip_idle or (match_reference_in_bf16 and in_place)" 2>&1 \
  | grep -v "^W" | tail -60 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|Error|PASSED" $OUT/gpu_tests.txt | tail -30
timeout 130 python -m benchmarks.gpu.fp8_matmul_probe --quantize-only --quantize-rows 768,2048 --quantize-inputs raw \
  --quantize-configs 1/16,1/16/p132,1/16/p132/auto/2,1/16/p132/auto/3,1/32/p132,1/8/p264/auto/2,2/4/2l/1024/2,4/8/2l/1024/2,4/8/2l/1024/3,8/8/2l/512/2 \
  --reps 5 2>&1 | grep -v "^W" | tee $OUT/quantize_probe.txt | cut -c1-400
timeout 290 python -m benchmarks.gpu.profile_run --quant fp8 --engine '{"kv_cache_dtype": "fp8"}' \
  --windows 60:63,1000:1003 --hlo 16,2048 --host-top 12 --out $OUT/prof 2>&1 | grep -v "^W" | tail -80 \
  > $OUT/profile_run.txt
gzip -f $OUT/prof/*.hlo.txt 2>/dev/null
head -c 9000 $OUT/prof/profile_run.md 2>/dev/null || tail -30 $OUT/profile_run.txt
