# Session 37, call 2 (~150 s; carry .gpu_wheels): the GPU test of the persistent attention programs, whose cases now
# also check prefill_programs=1056 (the prefill kernel's programs alone) against a program an item; call 1 reached
# its first four cases only.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 130 python -m pytest -m gpu -p no:cacheprovider -rA -v tests/pallas_kernels/test_kernels.py \
  -k "attention_programs" 2>&1 | grep -v "^W" | tail -40 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|Error|PASSED" $OUT/gpu_tests.txt | cut -c1-200 | tail -30
