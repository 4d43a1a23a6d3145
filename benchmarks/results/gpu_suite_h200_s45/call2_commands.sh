# Session 45, call 2 (~220 s; carry .gpu_wheels): the prefill split on long prompts' chunks (a chunk's few items each
# loop over many key blocks, where the ShareGPT-shaped steps of call 1 have many short items), then one offline run
# of the suite engine in bf16 (like for like with the anchors' bf16).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 110 python -m benchmarks.gpu.prefill_probe --reps 5 \
  --long 2048@2048,2048@4096,2048@8192,2048@16384,1024@16384+1024@1024,512@32768+1536@1536 \
  --variants 128:4:4:3:1056,128:4:4:3:1056:16,128:4:4:3:1056:32,128:4:4:3:1056:64 \
  2>&1 | grep -v "^W" | tee $OUT/prefill_probe_long.txt | tail -14
timeout 100 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 90 --configs "[{}]" \
  2>&1 | grep -v "^W" | tee $OUT/offline_bf16.txt | grep -v "^|" | grep "tok/s\|rror" | cut -c1-300
grep "^|" $OUT/offline_bf16.txt | cut -c1-400
