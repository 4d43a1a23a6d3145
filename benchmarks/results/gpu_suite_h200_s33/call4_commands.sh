# Session 33's fourth call (~400 s): `sampler_switch: "plain_full"` (greedy's and random's steps their own
# executables, plain and full one switched executable a bucket: 30 executables, e509fd9's count) against the
# tree's four variants (40), each from its own empty cache (round 0: the cold start), three rounds, every request
# temperature 1 with top-p 0.95 (the `plain` variant every step; the switch's plain branch).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 450 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "top_p": 0.95, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "top_p": 0.95, "sampler_switch": "plain_full", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_pf"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_switch.txt | grep -v "^|" | grep "compiled\|tok/s" | cut -c1-300
