# Session 33's third call, on the machine of calls 1-2 (its /tmp caches warm from call 1): temperature 1 on e509fd9,
# this tree, and this tree with `separate_sampler: "except_greedy"`, three rounds each from their warm caches (warm
# start and throughput; call 1's second round put except_greedy at 0.91x this tree, a round apart).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
ls -d /tmp/jc_base /tmp/jc_head /tmp/jc_eg 2>&1 | tee $OUT/caches.txt
timeout 470 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "tree": ".base_tree", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "separate_sampler": "except_greedy", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_eg"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_warm.txt | grep -v "^|" | grep "compiled\|tok/s" | cut -c1-300
