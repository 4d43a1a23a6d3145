# Sixteenth session, call 2: the decode kernel on fp8 pages -- its PTX (what the Triton pipeline made of the widened
# tiles), GPU tests of the fp8-products variants, their speed at the engine's shapes (short contexts) -- then
# the cold start: default, separate_sampler, except_greedy (each from its own empty compilation cache).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 60 python -m benchmarks.gpu.decode_ptx --out $OUT/ptx --kv-dtype fp8 --variants 8:4:3:264:rows,4:4:3:264:rows,8:4:3:264:rows:qk,8:4:3:264:rows:all 2>&1 | tail -8
timeout 30 python -m benchmarks.gpu.decode_ptx --out $OUT/ptx --kv-dtype bf16 --variants 4:4:3:264:rows 2>&1 | tail -4
timeout 60 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py -k fp8_products 2>&1 | tail -2 | tee $OUT/gpu_tests.txt
V=8:4:3:264:rows,8:4:4:264:rows,4:4:5:264:rows,8:4:3:264:rows:qk,8:4:3:264:rows:all,4:4:3:264:rows:all,8:4:4:264:rows:all,8:8:3:264:rows:all,16:4:3:264:rows:all
timeout 130 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-kernels decode --sweep-variants $V --sweep-points 32x512,768x304,96x640,256x2048 --points 768x304 --out $OUT/kernels_fp8_sweep.md 2>&1 | grep -v "^W\|Warning" | tail -3
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 150 --configs '[{"quant": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc0"}}, {"quant": "fp8", "separate_sampler": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc1"}}, {"quant": "fp8", "separate_sampler": "except_greedy", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc2"}}]' 2>&1 | grep -v "^W" | tee $OUT/ab_cold_start.txt | tail -14
