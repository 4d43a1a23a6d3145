# Prepared in session 36 for the next session (~420 s; carry .gpu_wheels): where the default's step time goes now
# (fused norms, fused quantization from every step, the rope kernel, the split merge kernel), which session 36 could
# not measure: profile_run's loop tables (of the run the traced windows are in, so perturbed) and traced kernel
# windows at a 2,048-token bucket (early, prompts) and a 16-token one (the run's tail), the 16- and 2,048-token
# steps' optimized HLO (gzipped).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 360 python -m benchmarks.gpu.profile_run --quant fp8 --engine '{"kv_cache_dtype": "fp8"}' \
  --windows 60:63,1000:1003 --hlo 16,2048 --host-top 12 --out $OUT/prof 2>&1 | grep -v "^W" | tail -80 \
  > $OUT/profile_run.txt
gzip -f $OUT/prof/*.hlo.txt 2>/dev/null
head -c 7000 $OUT/prof/profile_run.md 2>/dev/null || tail -30 $OUT/profile_run.txt
