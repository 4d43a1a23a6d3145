# Session 44, call 2 (~420 s; carry .gpu_wheels and .ab_trees/s44base; the machine of call 1, held warm: its JAX
# caches /tmp/jc_a, /tmp/jc_b and /tmp/prefill_probe.txt). The prefill probe's fastest variant (if under 0.97x the
# default) put in a copy of this tree (TUNED_PREFILL_BLOCKS' (128, 16) entry; its programs as prefill_programs);
# offline A/B, three rounds: the tree before, this tree, this tree with that variant (or, without one, the first
# two alone for three more rounds).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
BEST=$(grep -E "^\| [0-9]+:[0-9]+:[0-9]+:[0-9]+:[0-9]+ \|" /tmp/prefill_probe.txt 2>/dev/null | awk -F'|' '$4+0 > 0 {print $4+0, $2}' | sort -n | head -1)
echo "fastest prefill variant: $BEST" | tee $OUT/prefill_winner.txt
X=$(echo "$BEST" | awk '{print $1}'); V=$(echo "$BEST" | awk '{print $2}')
CONFIGS='[{"tree": ".ab_trees/s44base", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}'
if [ -n "$V" ] && awk "BEGIN {exit !($X < 0.97)}"; then
  IFS=: read R P W S G <<< "$V"
  mkdir -p /tmp/tp && tar --exclude=./.gpu_wheels --exclude=./.git --exclude=./.ab_trees -cf - . | tar -xf - -C /tmp/tp
  sed -i "s/(128, 16): PrefillBlockSizes(block_rows=128, pages_per_block=4, num_warps=4, num_stages=3)/(128, 16): PrefillBlockSizes(block_rows=$R, pages_per_block=$P, num_warps=$W, num_stages=$S)/" /tmp/tp/pallas_kernels/ragged_prefill.py
  grep -n "(128, 16): PrefillBlockSizes" /tmp/tp/pallas_kernels/ragged_prefill.py | tee -a $OUT/prefill_winner.txt
  PP=$G; [ "$G" = "0" ] && PP=null
  CONFIGS="$CONFIGS, {\"tree\": \"/tmp/tp\", \"quant\": \"fp8\", \"kv_cache_dtype\": \"fp8\", \"prefill_programs\": $PP, \"env\": {\"JAX_COMPILATION_CACHE_DIR\": \"/tmp/jc_c\"}}"
fi
CONFIGS="$CONFIGS]"
echo "$CONFIGS" | tee -a $OUT/prefill_winner.txt
timeout 420 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 100 --configs "$CONFIGS" \
  2>&1 | grep -v "^W" | tee $OUT/ab.txt | grep -v "^|" | grep "tok/s\|rror" | cut -c1-330
grep "^|" $OUT/ab.txt | cut -c1-400
