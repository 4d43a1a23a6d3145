# Session 34, call 4 (~450 s; carry .gpu_wheels): every GPU-marked test of the repository at once on jax 0.11.2
# (the CPU CI skips them; earlier sessions ran subsets), each test's outcome listed. The GPU-marked tests live in
# tests/jaxdyn and tests/pallas_kernels; six files of tests/serving and tests/checkpoints do not collect on the GPU
# machine (collection errors, one a RuntimeError of the grpc package), which the first try of this call found (16.9 s).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 470 python -m pytest -m gpu -p no:cacheprovider -rA -q --durations=15 tests/jaxdyn tests/pallas_kernels 2>&1 | grep -v "^W" | tail -100 > $OUT/gpu_tests_all.txt
grep -E "passed|failed|PASSED|FAILED|ERROR" $OUT/gpu_tests_all.txt | tail -60
