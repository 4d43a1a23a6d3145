# Seventeenth session, call 1: the persistent attention programs on a GPU for the first time: their GPU tests,
# the entry point's decode-only steps with 0 / 264 / 1,056 / 2,048 programs, and the offline A/B of
# attention_programs 1,056 against the default.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 140 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py -k "persistent or attention_programs" 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
timeout 120 python -m benchmarks.kernels --entry-only --entry-points 56/1024/256,726/768/304,726/768/100-1500,88/128/640,3/16/1100 --attention-programs 0,264,1056,2048 --out $OUT/kernels_entry.md 2>&1 | grep -v "^W\|Warning" | tail -30
timeout 300 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 140 --configs '[{"quant": "fp8"}, {"quant": "fp8", "attention_programs": 1056}]' 2>&1 | grep -v "^W" | tee $OUT/ab_programs.txt | tail -14
