# Session 44, call 4 (~160 s; carry .gpu_wheels; an H100): the split prefill kernel's GPU tests, then the prefill
# probe on three of the run's 2,048-token steps: the tuned blocks unsplit and split at 4 and 2 blocks a part, and
# the 64-row blocks split at 4.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 60 python -m pytest -m gpu -p no:cacheprovider -rA -q tests/pallas_kernels/test_kernels.py -k "split" \
  2>&1 | grep -v "^W" | tail -30 > $OUT/gpu_tests.txt; grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.txt | tail -6
timeout 85 python -m benchmarks.gpu.prefill_probe --steps 3 --reps 3 \
  --variants 128:4:4:3:1056,128:4:4:3:1056:4,128:4:4:3:1056:2,64:8:4:3:1056:4 2>&1 | grep -v "^W" | tee $OUT/prefill_probe.txt | tail -12
