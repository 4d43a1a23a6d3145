# Prepared in session 35 for the next session (~540 s; carry .gpu_wheels): every GPU-marked test (session 35 ran
# only 7 of them after the fused norms and the fused quantization from every step became the defaults); the fp8
# demo model's quality with the fused norms against the unfused layers in bf16 compute (on the GPU the kernel rounds
# the norm's output where XLA's compiled unfused layers do not); the default's cold start and greedy throughput (one round from an empty cache).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 240 python -m pytest -m gpu -p no:cacheprovider -rA -q --durations=10 tests/jaxdyn tests/pallas_kernels 2>&1 \
  | grep -v "^W" | tail -100 > $OUT/gpu_tests_all.txt
grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests_all.txt | tail -8
timeout 150 python benchmarks/quant_quality.py --compute-dtype bfloat16 2>&1 | grep -v "^W" | tee $OUT/quant_quality_bf16.txt \
  | grep "^|"
timeout 150 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_default.txt | grep -v "^|" | grep "tok/s\|compiled" | cut -c1-330
