# Session 34, call 3 (~450 s; carry .gpu_wheels and .base_tree = 245fd4f, the tree before the balanced decode
# kernel): the balanced kernel's GPU tests, then the entry point at drawn contexts with 0 (off) / 2 / 3 chunks,
# then the offline A/B: 245fd4f against the tree (fp8 pages balance with 2 chunks by default), two rounds each,
# each configuration with its own JAX cache (round 0 cold, round 1 warm).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 100 python -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_kernels.py -k "balanced or persistent" 2>&1 | tail -4 | tee $OUT/gpu_tests.txt
timeout 160 python -m benchmarks.kernels --kv-dtype fp8 --entry-only --decode-chunks 0,2,3 \
  --entry-points 39/64/200-1360,88/128/100-1180,220/256/100-850 2>&1 | grep -v "^W" | tail -32 | tee $OUT/entry_chunks.txt | grep "^entry"
timeout 310 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 140 --configs '[
  {"tree": ".base_tree", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_balanced.txt | grep -v "^|" | grep "tok/s" | cut -c1-330
