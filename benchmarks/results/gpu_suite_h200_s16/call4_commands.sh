# Sixteenth session, call 4: where separate_sampler's small steps lose their time (its cold start is the lowest,
# 51 s against 68-113 s, but call 2 measured its 16-token step at 6.8 ms against 4.6): profile_run's kernel
# table and engine loop table with the sampler compiled apart, and both executables' HLO at 16 tokens.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 280 python -m benchmarks.gpu.profile_run --quant fp8 --engine '{"separate_sampler": true}' --windows 150:160,500:510,900:910 --hlo 16 --out $OUT/prof_split 2>&1 | grep -v "^W\|Warning" | tail -45
