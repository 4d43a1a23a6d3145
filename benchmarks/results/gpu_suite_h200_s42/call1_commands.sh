# Prepared for session 42 (~480 s; carry .gpu_wheels; on an H100, kind nvidia-h100-x1): the decode kernel's small
# calls. Session 41 found the run 4 % slower without the 16-token bucket, likely because a call of more than
# `one_live_slots` (16) slots gets its context splits sized for all its slots: the 16-63-running steps (about 215 of
# the ShareGPT-shaped run, in the 64-token executable) may be held by a few long contexts looping in few programs.
# 1) the entry point at those shapes with one_live_slots 16 (this tree), 64 and 128 (copies, /tmp/live64 and
#    /tmp/live128; they also give such calls the 16-bit blocks over fp8 pages, as the 16-slot calls have; 256 slots
#    a control); 2) the offline A/B of this tree and /tmp/live64, three rounds, each from its own empty cache
#    (/tmp/live128 next if the kernel times favour it).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
for n in 64 128; do
  mkdir -p /tmp/live$n && cp -r benchmarks checkpoints jaxdyn pallas_kernels serving /tmp/live$n/
  sed -i "s/one_live_slots: int = 16\$/one_live_slots: int = $n/" /tmp/live$n/pallas_kernels/paged_decode.py
  grep -n "one_live_slots: int" /tmp/live$n/pallas_kernels/paged_decode.py
done
P=4/64/800-1600,20/64/600-1400,39/64/200-1360,60/64/200-1000,70/128/400-1400,100/128/200-1000,200/256/200-1000
PYTHONPATH=$PWD:/tmp/pydeps timeout 70 python -m benchmarks.kernels --kv-dtype fp8 --entry-only --entry-points $P \
  2>&1 | grep -v "^W" | tee $OUT/entry_live16.txt | tail -12
for n in 64 128; do
  (cd /tmp/live$n && PYTHONPATH=/tmp/live$n:/tmp/pydeps timeout 70 python -m benchmarks.kernels --kv-dtype fp8 \
    --entry-only --entry-points $P 2>&1 | grep -v "^W" | tee $OUT/entry_live$n.txt | tail -12)
done
export PYTHONPATH=$PWD:/tmp/pydeps
timeout 280 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"tree": "/tmp/live64", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_live64.txt | grep -v "^|" | grep "tok/s\|compiled\|rror" | cut -c1-330
grep "^|" $OUT/ab_live64.txt | cut -c1-400
