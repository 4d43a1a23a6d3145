# Session 32, call 3: the passes' tiles a loop (their lowering a third), and the fourth sampler variant (`random`:
# temperature and the draw alone). The GPU tests of the passes and the sampler; temperature 1 alone on e509fd9
# (`.base_tree`) against this tree, each from its own empty cache (the cold start with 40 executables against 30),
# two rounds; the sampler probe at 1,024 rows. Carry .gpu_wheels and .base_tree.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 90 python -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_sampling_thresholds.py \
  tests/jaxdyn/test_sampler.py 2>&1 | tail -4 | tee $OUT/gpu_tests.txt
timeout 240 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "tree": ".base_tree", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_temperature.txt | grep -v "^|" | grep "compiled\|tok/s" | cut -c1-300
timeout 100 python -m benchmarks.gpu.sampler_probe --rows 1024 2>&1 | grep -v "^W" | tee $OUT/sampler_probe.txt | head -16
