# Seventeenth session, call 2 (the machine still warm from call 1, its compilation cache kept): longest output
# first (schedule_policy "lof") against FCFS, alone and with attention_programs 1,056; then the host time of the
# sampler apart.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
ls /tmp/jc | wc -l
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 140 --configs '[{"quant": "fp8"}, {"quant": "fp8", "schedule_policy": "lof"}, {"quant": "fp8", "attention_programs": 1056, "schedule_policy": "lof"}]' 2>&1 | grep -v "^W" | tee $OUT/ab_lof.txt | tail -14
timeout 200 python -m benchmarks.gpu.profile_host --quant fp8 --engine '{"separate_sampler": true}' --datasets sharegpt-lengths 2>&1 | grep -v "^W\|Warning" | tee $OUT/profile_host_split.txt | tail -40
