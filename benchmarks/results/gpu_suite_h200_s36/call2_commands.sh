# Session 36, call 2 (~140 s; carry .gpu_wheels; the device time left allowed no A/B): the GPU tests not reached in
# call 1, with fused_rope_kv on by default: the rope kernel in the jitted model (bf16 and fp8 pages),
# skip_idle_prefill's step (in place with the split merge kernel), the entry point's kernel choice.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 120 python -m pytest -m gpu -p no:cacheprovider -rA -q tests/jaxdyn/test_fused_rope_kv.py \
  tests/pallas_kernels/test_kernels.py -k "rope or picks_the_kernels or skip_idle" 2>&1 \
  | grep -v "^W" | tail -60 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|PASSED|Error" $OUT/gpu_tests.txt | tail -40
