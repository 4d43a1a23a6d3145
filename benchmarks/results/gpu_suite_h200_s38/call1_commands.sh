# Prepared in session 37 (as next_call1_commands.sh), run in session 38 (~560 s; carry .gpu_wheels): the GPU test of the persistent attention
# programs (its cases check prefill_programs=1056 too; session 37 reached four), then the default against the
# session's two opt-in levers, three rounds each from its own empty JAX cache: seq_buckets [[2048, 512]] (the
# 2,048-token steps whose rows fit 512 slots take an executable of 512: their logits and sampler over 512 rows, not
# 1,024; about 73 of the run's 135 such steps) and, with it, prefill_programs 1056 (1.001x alone in session 37).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 110 python -m pytest -m gpu -p no:cacheprovider -rA -v tests/pallas_kernels/test_kernels.py \
  -k "attention_programs" 2>&1 | grep -v "^W" | tail -40 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|Error|PASSED" $OUT/gpu_tests.txt | cut -c1-200 | tail -30
timeout 420 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "seq_buckets": [[2048, 512]], "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "seq_buckets": [[2048, 512]], "prefill_programs": 1056,
   "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_c"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_seq_buckets.txt | grep -v "^|" | grep "tok/s\|compiled\|rror" | cut -c1-330
