# Twentieth session, call 4: the fp8 pages' decode blocks with more programs (min_programs: one-warp programs need
# about 4x the four-warp blocks' 264 to fill the GPU; 64- and 128-slot calls then split their contexts); the MLP's
# fused quantization from the raw products with 16 warps against 8; last, the engine offline with fp8 KV and an
# fp8 lm_head, as committed against a copy with both changes (fp8_programs_warps.patch), two rounds.
REPO=$PWD
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
timeout 90 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-variants 2:1:6:264:rows,2:1:6:528:rows,2:1:6:1056:rows,2:1:6:2112:rows --sweep-points 32x800,64x800,88x640,128x640,200x500 --out $OUT/kernels_fp8_programs.md 2>&1 | grep -v "^W" | tail -1
grep "^|" $OUT/kernels_fp8_programs.md
timeout 70 python -m benchmarks.gpu.fp8_matmul_probe --quantize-only --quantize-rows 768,2048 --quantize-inputs raw --quantize-configs 1/16 --reps 5 2>&1 | grep -v "^W" | tee $OUT/quantize_probe.txt
mkdir -p /tmp/pw && cp -r jaxdyn pallas_kernels checkpoints benchmarks serving /tmp/pw/
(cd /tmp/pw && patch -p1 < $REPO/benchmarks/results/gpu_suite_h200_s20/fp8_programs_warps.patch)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 310 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 170 --configs '[{"quant": "fp8", "kv_cache_dtype": "fp8", "quantize_lm_head": true}, {"quant": "fp8", "kv_cache_dtype": "fp8", "quantize_lm_head": true, "tree": "/tmp/pw"}]' 2>&1 | grep -v "^W" | tee $OUT/ab_programs_warps.txt | tail -9
