# Session 42, call 2 (~560 s; carry .gpu_wheels; an H100): `few_live_max_slots` (a 64-slot call of 17-63 live
# sequences split as a few live sequences need). 1) the entry point at 10/20/39 live of 64 slots: the tree (off),
# /tmp/fl16 (64 slots, a grid for 16 live: 4 splits over fp8 blocks) and /tmp/fl8 (a grid for 8: 8 splits); 2) the
# offline A/B of the tree against the faster of the two (by the entry's summed µs), three rounds from empty caches.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
for n in 16 8; do
  mkdir -p /tmp/fl$n && cp -r benchmarks checkpoints jaxdyn pallas_kernels serving /tmp/fl$n/
  sed -i -e "s/few_live_max_slots: int = 0\$/few_live_max_slots: int = 64/" \
         -e "s/few_live_grid_for: int = 16\$/few_live_grid_for: int = $n/" /tmp/fl$n/pallas_kernels/paged_decode.py
  grep -n "few_live_max_slots: int\|few_live_grid_for: int" /tmp/fl$n/pallas_kernels/paged_decode.py
done
P=10/64/600-1400,20/64/600-1400,39/64/200-1360
for t in tree fl16 fl8; do
  d=$PWD; [ $t = tree ] || d=/tmp/$t
  (cd $d && PYTHONPATH=$d:/tmp/pydeps timeout 75 python -m benchmarks.kernels --kv-dtype fp8 --entry-only \
    --entry-points $P 2>&1 | grep -v "^W" | tee $OUT/entry_$t.txt | grep "^entry")
done
best=$(for t in fl16 fl8; do awk -v t=$t '/^entry/ {s += $8} END {if (NR) print s, t}' $OUT/entry_$t.txt; done \
       | sort -n | head -1 | cut -d' ' -f2)
[ -n "$best" ] || best=fl16
echo "A/B: tree against /tmp/$best" | tee $OUT/ab_choice.txt
export PYTHONPATH=$PWD:/tmp/pydeps
timeout 300 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"tree": "/tmp/'$best'", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_few_live.txt | grep -v "^|" | grep "tok/s\|rror" | cut -c1-330
grep "^|" $OUT/ab_few_live.txt | cut -c1-400
