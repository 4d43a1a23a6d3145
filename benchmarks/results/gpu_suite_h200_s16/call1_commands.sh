# Sixteenth session, call 1: GPU tests of the kernels; a decode block sweep on fp8 pages (why fp8 pages read at
# 0.72 of the copy rate where bf16 pages read at it); where an fp8-KV engine's steps spend their time
# (profile_run, fp8 weights, KV fp8 then KV bf16 in the same call), with the 16-token step's optimized HLO.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 110 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py 2>&1 | tail -4 | tee $OUT/gpu_tests.txt
V=8:4:3:264:rows,8:4:2:264:rows,8:4:4:264:rows,8:8:2:264:rows,8:8:3:264:rows,16:4:2:264:rows,16:8:2:264:rows,16:8:3:264:rows,4:4:3:264:rows,4:4:5:264:rows,4:8:4:264:rows,8:4:3:528:rows,8:4:3:264:pages,16:8:2:264:pages
timeout 150 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-kernels decode --sweep-variants $V --sweep-points 64x2048,256x2048,32x512 --points 256x2048 --out $OUT/kernels_fp8_sweep.md 2>&1 | grep -v "^W\|Warning" | tail -4
timeout 170 python -m benchmarks.gpu.profile_run --quant fp8 --engine '{"kv_cache_dtype": "fp8"}' --windows 3:8,150:160,500:510,900:910 --hlo 16 --out $OUT/prof_kvfp8 2>&1 | grep -v "^W\|Warning" | tail -30
timeout 150 python -m benchmarks.gpu.profile_run --quant fp8 --windows 3:8,150:160,500:510,900:910 --hlo 16 --out $OUT/prof_kvbf16 2>&1 | grep -v "^W\|Warning" | tail -30
