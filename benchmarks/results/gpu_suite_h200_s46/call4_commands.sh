# Session 46, call 4 (~300 s; carry .gpu_wheels): the engine's new default memory share (0.9) read back from JAX;
# a profile of the suite engine in bf16 (the like-for-like engine against the bf16 anchors; 2,048-token steps at the
# start, 16-token steps in the tail, both steps' optimized HLO) at the suite's bf16 pages (20,480, 40 GiB); then the
# layer stack's bf16 products alone at the buckets' rows against the matmul rate and copy bandwidth.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
python -c "
from jaxdyn.engine.xla_options import gpu_memory_fraction
print('set', gpu_memory_fraction(None))
import jax
s = jax.devices()[0].memory_stats()
print(f\"bytes_limit {s['bytes_limit'] / 2**30:.2f} GiB\")" 2>&1 | grep -v "^W" | tee $OUT/call4_memory_fraction.txt
JAX_COMPILATION_CACHE_DIR=/tmp/jc_bf16 timeout 200 python -m benchmarks.gpu.profile_run \
  --windows 60:63,1000:1003 --hlo 16,2048 --out $OUT/prof 2>&1 | grep -v "^W" | tee $OUT/call4_profile_run.txt | tail -30
timeout 70 python -m benchmarks.gpu.gemm_probe --rows 16,256,2048 --reps 5 2>&1 | grep -v "^W" \
  | tee $OUT/call4_gemm_probe.txt | tail -8
