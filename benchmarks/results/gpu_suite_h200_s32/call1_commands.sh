# Session 32, call 1: session 31's unmeasured form plus the passes skipping settled tiles (the probe times both).
# lowered once a mode a step (the cold start's lowering had gone from 13.6 to 45.1 s) and scaling / flooring the
# unscaled logits as they read them (temperature-only steps had run 0.972x the tree before). Offline, two rounds:
# temperature 1 alone on e509fd9 (`.base_tree`) and on this tree, each from its own empty cache (this tree's load is
# its cold start), then top-p 0.95 on this tree (warm); then the GPU tests and the sampler probe at 1,024 rows (its temperature-only rows now arguments). Carry .gpu_wheels and .base_tree.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 230 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 90 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "tree": ".base_tree", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 0.8, "top_p": 0.95, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_sampled.txt | grep -v "^|" | grep "compiled\|tok/s" | cut -c1-400
timeout 80 python -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_sampling_thresholds.py \
  tests/jaxdyn/test_sampler.py 2>&1 | tail -3 | tee $OUT/gpu_tests.txt
timeout 100 python -m benchmarks.gpu.sampler_probe --rows 1024 2>&1 | grep -v "^W" | tee $OUT/sampler_probe.txt | head -16
