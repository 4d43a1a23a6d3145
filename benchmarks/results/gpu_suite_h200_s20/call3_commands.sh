# Twentieth session, call 3: where fp8 KV pages fall short of their bytes in the run (the schedule simulation gives
# 18,142 tok/s at half the KV read time, 16,095 were measured): decode-only steps through the entry point at the
# run's shapes (live / slots / context) over fp8 and bf16 pages; then profile_run's kernel windows with fp8 KV pages.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
PTS=56/1024/256,726/768/304,200/256/500,88/128/640,30/64/800,12/16/900,3/16/1100
for kv in fp8 bf16; do
  timeout 80 python -m benchmarks.kernels --entry-only --kv-dtype $kv --entry-points $PTS --out $OUT/entry_$kv.md 2>&1 | grep -v "^W" | tail -1
  grep "^|" $OUT/entry_$kv.md
done
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 330 python -m benchmarks.gpu.profile_run --quant fp8 --quantize-lm-head --engine '{"kv_cache_dtype": "fp8"}' --windows 3:8,150:160,500:510,900:910 --out $OUT/prof 2>&1 | grep -v "^W" | tail -60
