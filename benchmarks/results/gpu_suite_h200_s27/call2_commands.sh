# Session 27's second call (~420 s at most): is SKIP_TEMP correct, and is its 1.071x of call 1 real?
# 1. outputs_digest: greedy tokens and logprobs of 200 ShareGPT-shaped requests (8B shape, fp8, fp8 KV), default
#    against SKIP_TEMP (a second default run where they differ, to see whether the engine is deterministic there).
# 2. ab_offline, three rounds: the tree against SKIP_TEMP (call 1's JAX caches when the machine kept them).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
ST=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
D="python -m benchmarks.gpu.outputs_digest --quant fp8 --engine {\"kv_cache_dtype\":\"fp8\"} --num-prompts 200"
JAX_COMPILATION_CACHE_DIR=/tmp/jc_tree timeout 130 $D --out $OUT/digest_default.json 2>&1 | grep -v "^W" | tee -a $OUT/digest.txt | tail -4
XLA_FLAGS=$ST JAX_COMPILATION_CACHE_DIR=/tmp/jc_st timeout 130 $D --out $OUT/digest_skip_temp.json 2>&1 | grep -v "^W" | tee -a $OUT/digest.txt | tail -4
python -m benchmarks.gpu.outputs_digest --compare $OUT/digest_default.json $OUT/digest_skip_temp.json | tee -a $OUT/digest.txt
if ! cmp -s $OUT/digest_default.json $OUT/digest_skip_temp.json; then
  JAX_COMPILATION_CACHE_DIR=/tmp/jc_tree timeout 60 $D --out $OUT/digest_default2.json 2>&1 | grep -v "^W" | tail -1
  python -m benchmarks.gpu.outputs_digest --compare $OUT/digest_default.json $OUT/digest_default2.json | sed 's/^/default twice: /' | tee -a $OUT/digest.txt
fi
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 130 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_tree"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_st", "XLA_FLAGS": "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_update_mode.txt | tail -8
