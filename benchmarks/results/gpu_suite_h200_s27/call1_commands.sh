# Session 27's first call (~500 s at most by its limits). Does the device idle while a step's call updates its
# command buffer, and does an update mode that keeps buffers in place change the throughput?
# 1. dispatch_probe of the tree (fp8 weights and pages, buckets 128 and 512) under ALWAYS_UPDATE (default),
#    SKIP_TEMP and SKIP_PROFILED (session 26's call3_commands.sh).
# 2. ab_offline, two rounds: the tree against the tree under SKIP_TEMP, each from its own empty JAX cache.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)" | tee -a $OUT/device.txt
probe() {   # $1: label
  timeout 80 python -m benchmarks.gpu.dispatch_probe --quant fp8 --buckets 128,512 --steps 30 \
    --runner '{"kv_cache_dtype": "fp8"}' 2>&1 | grep -v "^W" | sed "s|^reproduce:|$1, reproduce:|" \
    | tee -a $OUT/dispatch.md | tail -10; }
probe "tree"
TAKEN=""
for MODE in SKIP_TEMP SKIP_PROFILED; do
  if XLA_FLAGS=--xla_gpu_command_buffer_update_mode=$MODE python -c "import jax; jax.numpy.ones(1).block_until_ready()" \
      > /dev/null 2>&1; then
    TAKEN="$TAKEN $MODE"
    XLA_FLAGS=--xla_gpu_command_buffer_update_mode=$MODE probe "tree, update mode $MODE"
  else echo "update mode $MODE: not taken by this jaxlib" | tee -a $OUT/dispatch.md; fi; done
case "$TAKEN" in *SKIP_TEMP*)
  timeout 300 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 130 --configs '[
    {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_tree"}},
    {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_st", "XLA_FLAGS": "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"}}]' \
    2>&1 | grep -v "^W" | tee $OUT/ab_update_mode.txt | tail -8;;
esac
