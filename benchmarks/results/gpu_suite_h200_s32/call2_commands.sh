# Session 32, call 2: call 1's GPU tests and offline A/B had run past their limits on a slower H100 (cold loads of
# 68-84 s against 38 s in session 31). The GPU tests of the passes (skipping settled tiles, scaling and flooring as
# they read) and the sampler, then temperature 1 alone on e509fd9 (`.base_tree`) against this tree, each from its
# own empty cache, and top-p 0.95 on this tree (warm), two rounds. Carry .gpu_wheels and .base_tree.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_sampling_thresholds.py \
  tests/jaxdyn/test_sampler.py 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
timeout 370 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 150 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "tree": ".base_tree", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 0.8, "top_p": 0.95, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_sampled.txt | grep -v "^|" | grep "compiled\|tok/s" | cut -c1-300
