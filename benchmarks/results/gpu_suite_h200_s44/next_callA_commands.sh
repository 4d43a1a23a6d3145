# Next session, call A (~230 s; carry .gpu_wheels; an H100): the split prefill kernel's GPU tests (never run on a
# GPU: session 44's device time ran out), then the prefill probe on six of the run's 2,048-token steps: the tuned
# blocks unsplit (session 44: ~99 µs a layer, set by the longest chunk) and split at 6, 4, 3 and 2 blocks a part,
# the 64-row blocks (0.90x unsplit) split at 4.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 60 python -m pytest -m gpu -p no:cacheprovider -rA -q tests/pallas_kernels/test_kernels.py -k "split" \
  2>&1 | grep -v "^W" | tail -30 > $OUT/gpu_tests.txt; grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.txt | tail -6
timeout 160 python -m benchmarks.gpu.prefill_probe --steps 6 --reps 5 \
  --variants 128:4:4:3:1056,128:4:4:3:1056:6,128:4:4:3:1056:4,128:4:4:3:1056:3,128:4:4:3:1056:2,64:8:4:3:1056:4 \
  2>&1 | grep -v "^W" | tee $OUT/prefill_probe.txt | tail -14
