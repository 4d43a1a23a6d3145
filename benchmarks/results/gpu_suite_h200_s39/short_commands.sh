# Session 39's short call (~380 s; carry .gpu_wheels), for when the device time left cannot hold the full one:
# the suite engine alone, three rounds from an empty JAX cache (the #10 figure on this host, and the warm-up's step
# costs timed round by round on a GPU for the first time), then its profile from its warm cache.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 150 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_default.txt | grep -v "^|" | grep "tok/s\|compiled\|rror" | cut -c1-330
grep "^|" $OUT/ab_default.txt | cut -c1-400
export JAX_COMPILATION_CACHE_DIR=/tmp/jc_b JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
timeout 200 python -m benchmarks.gpu.profile_run --quant fp8 --engine '{"kv_cache_dtype": "fp8"}' \
  --windows 60:63,1000:1003 --hlo 16,2048 --host-top 12 --out $OUT/prof 2>&1 | grep -v "^W" | tail -80 \
  > $OUT/profile_run.txt
gzip -f $OUT/prof/*.hlo.txt 2>/dev/null
head -c 5000 $OUT/prof/profile_run.md 2>/dev/null || tail -30 $OUT/profile_run.txt
