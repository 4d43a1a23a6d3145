# Session 33's sixth call (the device time's remainder, ~150 s): the tree as committed (sampler switch by device:
# plain_full on the GPU, 30 executables), greedy, from an empty cache (round 0: the cold start on another host)
# and then warm (round 1: the warm start).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 190 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_default.txt | grep -v "^|" | grep "compiled\|tok/s" | cut -c1-300
