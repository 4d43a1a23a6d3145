# Session 31, call 1 (~590 s): penalties and filters in `plain` (no sort; the penalties three scatters); the thresholds' passes (a Pallas call a pass, a program a (row, chunk)) on a GPU:
# their tests, the sampler probe (every form and part at 64 / 256 / 1,024 rows), and sampled offline runs
# (temperature 0.8, top-p 0.95: the `plain` variant now, which filters with the passes) and temperature 1 alone (top-p 1: `plain`, its filters' passes reading nothing) against the tree before
# (e509fd9, `.base_tree`: such rows ran `full`, with two vocabulary sorts). Carry .gpu_wheels and .base_tree.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 90 python -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_sampling_thresholds.py \
  tests/jaxdyn/test_sampler.py 2>&1 | tail -5 | tee $OUT/gpu_tests.txt
timeout 170 python -m benchmarks.gpu.sampler_probe --rows 64,256,1024 2>&1 | grep -v "^W" | tee $OUT/sampler_probe.txt \
  | head -24
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 0.8, "top_p": 0.95, "tree": ".base_tree", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 0.8, "top_p": 0.95, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "tree": ".base_tree", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_sampled.txt | tail -10
