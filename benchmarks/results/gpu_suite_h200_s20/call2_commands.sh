# Twentieth session, call 2: the lm_head's forms alone (bf16, fp8 with its product in f32 or bf16, w8a16); the fp8
# decode kernel with V widened through f32 (session 19's v_upcast_f32.patch) against the repository's; the bf16
# pages' 2-warp blocks at the points of few sequences; last, the engine offline with fp8 KV against the same with an
# fp8 lm_head whose product is bf16 (a copy of the tree with FP8_LOGITS_PRODUCT = jnp.bfloat16).
REPO=$PWD
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
timeout 70 python -m benchmarks.gpu.lm_head_probe --rows 16,64,256,768,1024 2>&1 | grep -v "^W" | tee $OUT/lm_head_probe.txt
for d in vp hb; do mkdir -p /tmp/$d && cp -r jaxdyn pallas_kernels checkpoints benchmarks serving /tmp/$d/; done
(cd /tmp/vp && patch -p1 < $REPO/benchmarks/results/gpu_suite_h200_s19/v_upcast_f32.patch)
sed -i 's/^FP8_LOGITS_PRODUCT = jnp.float32/FP8_LOGITS_PRODUCT = jnp.bfloat16/' /tmp/hb/jaxdyn/models/llama.py
grep -n "^FP8_LOGITS_PRODUCT" /tmp/hb/jaxdyn/models/llama.py
SWEEP="--decode-only --kv-dtype fp8 --sweep-variants 2:1:6:264:rows,2:2:6:264:rows,4:4:3:264:rows --sweep-points 768x304,256x512,256x2048"
(cd /tmp/vp && timeout 50 python -m benchmarks.kernels $SWEEP --out $OUT/kernels_fp8_vupcast.md 2>&1 | grep -v "^W" | tail -1)
grep "^|" $OUT/kernels_fp8_vupcast.md
timeout 50 python -m benchmarks.kernels $SWEEP --out $OUT/kernels_fp8.md 2>&1 | grep -v "^W" | tail -1
grep "^|" $OUT/kernels_fp8.md
timeout 60 python -m benchmarks.kernels --decode-only --sweep-variants 4:4:3:264:rows,4:2:3:264:rows,4:2:3:528:rows --sweep-points 1x2048,8x2048,64x2048,768x304 --out $OUT/kernels_bf16.md 2>&1 | grep -v "^W" | tail -1
grep "^|" $OUT/kernels_bf16.md
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 300 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 170 --configs '[{"quant": "fp8", "kv_cache_dtype": "fp8"}, {"quant": "fp8", "kv_cache_dtype": "fp8", "quantize_lm_head": true, "tree": "/tmp/hb"}]' 2>&1 | grep -v "^W" | tee $OUT/ab_head_bf16.txt | tail -9
