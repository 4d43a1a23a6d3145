# Session 42, call 3 (~400 s; carry .gpu_wheels; an H100): every GPU-marked test of tests/jaxdyn and
# tests/pallas_kernels on the GPU's JAX (last run all at once in session 35: 72 of 72).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/pydeps XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a $OUT/device.txt
timeout 520 python -m pytest -m gpu -p no:cacheprovider -q -rA --durations=10 tests/jaxdyn tests/pallas_kernels \
  2>&1 | grep -v "^W\|Warning\|warnings.warn" | tee $OUT/gpu_tests_all.txt | grep -E "FAILED|ERROR|passed|failed|error" | tail -30
