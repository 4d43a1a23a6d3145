# Thirtieth session, call 2 (~480 s at most). Carry .gpu_wheels and a .base_tree of 899d50e (session 28's call-5
# tree, 14,774 output tok/s on an H100):
#   rm -rf .base_tree && mkdir .base_tree && git archive 899d50e jaxdyn pallas_kernels checkpoints serving \
#     benchmarks pyproject.toml | tar -x -C .base_tree && rm -rf .base_tree/benchmarks/results .base_tree/checkpoints/demo
# 1. Nsight Compute at 88 x 640 (fp8 pages, the tuned blocks): warp states, issue, memory.
# 2. offline, greedy, 8B fp8 + fp8 KV: session 28's tree against HEAD (session 29's prompt-logprob rows in the
#    scheduler and the runner's packing: no regression expected) and HEAD with attention_fp8_products "qk";
#    two rounds, each configuration from its own JAX cache.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
test -f .base_tree/benchmarks/gpu/profile_run.py || echo "no .base_tree: make it and carry it (see above)"
NCU="ncu --clock-control none --kernel-name regex:paged_decode --launch-skip 2 --launch-count 1"
for P in off; do
  timeout 50 $NCU --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis \
    python -m benchmarks.gpu.ncu_decode --batch 88 --context 640 --kv-dtype fp8 --fp8-products $P \
    > $OUT/ncu_88x640_$P.txt 2>&1
  grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Issued Warp|Eligible Warps|Warp Cycles Per Issued|Stall|Dynamic Shared" $OUT/ncu_88x640_$P.txt | head -24
done
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
timeout 400 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 130 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "tree": ".base_tree", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "attention_fp8_products": "qk", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_qk"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_base_head_qk.txt | tail -8
