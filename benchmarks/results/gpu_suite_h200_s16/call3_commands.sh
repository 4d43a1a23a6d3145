# Sixteenth session, call 3: the cold start with warm-up compiling each bucket's first executable before any
# bucket's second (runner.interleave_shapes) against the order before it (.ab_trees/base = `git archive 1f0eec5`,
# the commit before), and with XLA's kernel cache file on top; each from its own empty compilation cache.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 420 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 140 --configs '[{"quant": "fp8", "tree": ".ab_trees/base", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc0", "PYTHONPATH": "/tmp/pydeps"}}, {"quant": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc1"}}, {"quant": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc2", "XLA_FLAGS": "--xla_gpu_kernel_cache_file=/tmp/kc2"}}]' 2>&1 | grep -v "^W" | tee $OUT/ab_cold_order.txt | tail -14
