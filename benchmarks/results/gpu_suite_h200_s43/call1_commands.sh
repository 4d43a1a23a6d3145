# Session 43, call 1 (~420 s; carry .gpu_wheels; an H100, kind nvidia-h100-x1). 1) The fp8 decode kernel's blocks
# swept on an H100 (the table came from an H200 sweep, session 19) at the shapes of the run's large steps (session
# 40's profile: the 2,048-token step's decode attention at 1.67x its bytes, 431 rows x 274 tokens). 2) If the sweep's
# winner is not the table's 2:1:6, the offline A/B of the tree against a copy with the winner in the table (three
# rounds each from its own empty cache); otherwise the opt-in levers (default against lof + the fp8 lm_head).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 170 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-points 432x274,768x304,256x512,64x800 --points 432x274 \
  --sweep-variants 2:1:6:264:rows,2:2:6:264:rows,4:1:6:264:rows,4:2:4:264:rows,2:1:8:264:rows,1:1:8:264:rows \
  --out $OUT/fp8_blocks_h100.md 2>&1 | grep -v "^W" > $OUT/fp8_blocks_h100.txt; tail -14 $OUT/fp8_blocks_h100.txt
W=$(grep -o "decode block sweep winner.*" $OUT/fp8_blocks_h100.txt | head -1)
P=$(echo "$W" | sed -n 's/.*pages_per_block=\([0-9]*\).*/\1/p')
NW=$(echo "$W" | sed -n 's/.*num_warps=\([0-9]*\).*/\1/p')
NS=$(echo "$W" | sed -n 's/.*num_stages=\([0-9]*\).*/\1/p')
echo "winner: $P:$NW:$NS" | tee $OUT/winner.txt
if [ -n "$P" ] && [ -n "$NW" ] && [ -n "$NS" ] && [ "$P:$NW:$NS" != "2:1:6" ]; then
  mkdir -p /tmp/tb && tar --exclude=./.gpu_wheels --exclude=./.git --exclude=./.ab_trees -cf - . | tar -xf - -C /tmp/tb
  sed -i "s/(128, 16): DecodeBlockSizes(pages_per_block=2, num_warps=1, num_stages=6, min_programs=264)/(128, 16): DecodeBlockSizes(pages_per_block=$P, num_warps=$NW, num_stages=$NS, min_programs=264)/" /tmp/tb/pallas_kernels/paged_decode.py
  grep -n "(128, 16): DecodeBlockSizes(pages_per_block=$P, num_warps=$NW, num_stages=$NS, min_programs=264)" /tmp/tb/pallas_kernels/paged_decode.py | tee -a $OUT/winner.txt
  CONFIGS='[{"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
    {"tree": "/tmp/tb", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]'
else
  CONFIGS='[{"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
    {"quant": "fp8", "kv_cache_dtype": "fp8", "schedule_policy": "lof", "quantize_lm_head": true,
     "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_c"}}]'
fi
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs "$CONFIGS" \
  2>&1 | grep -v "^W" | tee $OUT/ab.txt | grep -v "^|" | grep "tok/s\|rror" | cut -c1-330
grep "^|" $OUT/ab.txt | cut -c1-400
