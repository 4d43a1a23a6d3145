# Session 23's first device call (at most ~575 s by its limits): s21's next_call2 (the cold start and throughput of
# the tree as committed, the memset tree and --sampler-switch, each from its own empty JAX cache, two rounds) with
# s21's next_call3's first command ahead of it (the nested layers' compiled step against the unrolled one's on the
# GPU: last line same / differ), since nested_layers is the default every configuration below runs with.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 75 python benchmarks/nested_layers_check.py --quant fp8 --buckets 16,2048 --sampler-switch 2>&1 | grep -v "^W" \
  | tee $OUT/nested_layers_check.txt | tail -8
R=$PWD; mkdir -p /tmp/memset && cp -r jaxdyn pallas_kernels checkpoints benchmarks serving /tmp/memset/ \
  && (cd /tmp/memset && patch -p1 < $R/benchmarks/results/gpu_suite_h200_s21/attention_memset.patch) | tail -1
timeout 45 python -m pytest -q -m gpu tests/pallas_kernels/test_sampling_thresholds.py 2>&1 | tail -2 | tee $OUT/tests_thresholds.txt
grep -q " passed" $OUT/tests_thresholds.txt && ! grep -q "failed\|error" $OUT/tests_thresholds.txt && TH=auto || TH=reference
echo "thresholds for the switch: $TH" | tee -a $OUT/tests_thresholds.txt
timeout 430 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 160 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "sampler_switch": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_switch", "JAXDYN_SAMPLING_THRESHOLDS": "'$TH'"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "tree": "/tmp/memset", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_memset"}}]' 2>&1 | grep -v "^W" | tee $OUT/ab_base_switch_memset.txt | tail -16
