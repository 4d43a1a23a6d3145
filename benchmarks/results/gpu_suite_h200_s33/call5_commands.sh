# Session 33's fifth call (~300 s; carry .gpu_wheels and .ab_trees/lpt): the cold start of the tree as committed
# (sampler_switch by device: "plain_full" on the GPU, 30 executables) against the same with warm-up's costliest
# parts compiled first (.ab_trees/lpt: switched steps before greedy's and random's), one round each from an empty
# cache, greedy requests (the round's run: greedy throughput after a cold start).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 300 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "tree": ".ab_trees/lpt", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_cold.txt | grep -v "^|" | grep "compiled\|tok/s" | cut -c1-300
