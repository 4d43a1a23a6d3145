# Sourced after a script that installed the wheels, exported PYTHONPATH and ran the suite engine with its JAX cache in
# /tmp/jc_b (shortest_commands.sh, session 38's next_call1_commands.sh): that engine's profile from its warm cache
# (loop tables, traced windows at a 2,048- and a 16-token bucket, both steps' optimized HLO), ~240 s.
export JAX_COMPILATION_CACHE_DIR=/tmp/jc_b JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
timeout 240 python -m benchmarks.gpu.profile_run --quant fp8 --engine '{"kv_cache_dtype": "fp8"}' \
  --windows 60:63,1000:1003 --hlo 16,2048 --host-top 12 --out $OUT/prof 2>&1 | grep -v "^W" | tail -80 \
  > $OUT/profile_run.txt
gzip -f $OUT/prof/*.hlo.txt 2>/dev/null
head -c 5000 $OUT/prof/profile_run.md 2>/dev/null || tail -30 $OUT/profile_run.txt
