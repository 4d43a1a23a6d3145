# Session 33's first call (session 32's next_call1_commands.sh; ~450 s; carry .gpu_wheels and .base_tree of e509fd9). Session 32's final form: the
# passes as one kernel (18 calls, one lowering and Triton compilation an executable), the `random` variant (40
# executables). GPU tests of the passes and the sampler; then temperature 1 alone on e509fd9, on this tree, and on
# this tree with `separate_sampler: "except_greedy"` (the model compiled twice a bucket instead of four times:
# greedy steps one call, sampled ones two), each from its own empty cache in round 0 (its cold start); two rounds
# (session 32's call 3 lost a round to the call's limit on a machine whose cold loads took 57-80 s).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 80 python -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_sampling_thresholds.py \
  tests/jaxdyn/test_sampler.py 2>&1 | tail -4 | tee $OUT/gpu_tests.txt
timeout 420 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "tree": ".base_tree", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "separate_sampler": "except_greedy", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_eg"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_sampled.txt | grep -v "^|" | grep "compiled\|tok/s" | cut -c1-300
