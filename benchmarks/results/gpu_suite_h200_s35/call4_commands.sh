# Session 35, call 4 (~300 s; carry .gpu_wheels): every GPU-marked test of tests/jaxdyn and tests/pallas_kernels.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 500 python -m pytest -m gpu -p no:cacheprovider -rA -q --durations=10 tests/jaxdyn tests/pallas_kernels 2>&1 \
  | grep -v "^W" | tail -100 > $OUT/gpu_tests_all.txt
grep -E "passed|failed|FAILED|ERROR" $OUT/gpu_tests_all.txt | tail -8
