# Session 35, call 2 (~420 s; carry .gpu_wheels; ran at 1e41e9c, whose kernel had SMALL_BLOCKS / LARGE_BLOCKS): the fused norm kernel's blocks swept at 16-2,048 rows; a copy of
# the tree (/tmp/large) takes the fastest blocks at 2,048 rows as its LARGE_BLOCKS; then the offline A/B, two rounds,
# each configuration with its own JAX cache: fp8_fused_norm off, on, and on in that copy.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 150 python -m benchmarks.gpu.norm_probe --rows 16,128,512,1024,2048 --configs 1/4,1/8,2/4,2/8,4/8,4/16,8/16 \
  2>&1 | grep -v "^W" | tee $OUT/norm_probe.txt
BEST=$(grep "^best at 2048 rows:" $OUT/norm_probe.txt | awk '{print $NF}')
R=${BEST%/*}; W=${BEST#*/}
mkdir -p /tmp/large && cp -r jaxdyn pallas_kernels benchmarks checkpoints serving pyproject.toml /tmp/large/
sed -i "s|^SMALL_BLOCKS, LARGE_BLOCKS, LARGE_ROWS = .*|SMALL_BLOCKS, LARGE_BLOCKS, LARGE_ROWS = (1, 8), (${R:-1}, ${W:-4}), 2048|" \
  /tmp/large/pallas_kernels/rms_norm_fp8.py
grep "^SMALL_BLOCKS" /tmp/large/pallas_kernels/rms_norm_fp8.py | tee $OUT/large_blocks.txt
timeout 400 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "fp8_fused_norm": false, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "fp8_fused_norm": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}},
  {"tree": "/tmp/large", "quant": "fp8", "kv_cache_dtype": "fp8", "fp8_fused_norm": true,
   "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_c"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_blocks.txt | grep -v "^|" | grep "tok/s\|compiled" | cut -c1-330
