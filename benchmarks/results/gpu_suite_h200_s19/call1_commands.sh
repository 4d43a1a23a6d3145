# Nineteenth session, call 1 (commit 350b310): the decode kernel with a program for each sequence and group of kv
# heads (heads_per_program), on the GPU against a program a head: equality, then block sweeps over fp8 and bf16
# pages at an engine's short contexts (768 x 304, as in a ShareGPT-shaped run's 768-token decode steps) and longer.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
timeout 150 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py -k "heads_per_program" 2>&1 | tail -4 | tee $OUT/tests.txt
timeout 200 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-variants 8:4:3:264:rows,8:4:3:264:rows:2,8:4:3:264:rows:4,8:4:3:264:rows:8,4:4:3:264:rows:8,8:4:4:264:rows:8,16:4:2:264:rows:8 --sweep-points 768x304,256x512,256x2048 --points 768x304 --out $OUT/kernels_fp8.md 2>&1 | grep -v "^W" | tail -3
timeout 200 python -m benchmarks.kernels --decode-only --sweep-variants 4:4:3:264:rows,4:4:3:264:rows:2,4:4:3:264:rows:4,4:4:3:264:rows:8,8:4:3:264:rows:8,4:4:4:264:rows:8 --sweep-points 768x304,256x512,256x2048 --points 768x304 --out $OUT/kernels_bf16.md 2>&1 | grep -v "^W" | tail -3
cat $OUT/kernels_fp8.md $OUT/kernels_bf16.md | grep -v "^Device\|^Decode:\|^Measured"
