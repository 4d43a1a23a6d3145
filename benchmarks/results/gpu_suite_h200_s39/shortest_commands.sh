# Session 39's shortest call (~170 s; carry .gpu_wheels): the suite engine alone, three rounds from an empty JAX cache
# (the #10 figure on this host, and the warm-up's step costs timed round by round on a GPU for the first time).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 150 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_default.txt | grep -v "^|" | grep "tok/s\|compiled\|rror" | cut -c1-330
grep "^|" $OUT/ab_default.txt | cut -c1-400
