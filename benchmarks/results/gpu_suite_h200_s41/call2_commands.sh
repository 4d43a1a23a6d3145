# Session 41, call 2 (~220 s; carry .gpu_wheels): the decode kernel through the entry point at the small buckets'
# decode-only shapes (a few to 60 live sequences of long contexts in 64 slots; 100 in 128 slots as a control), as the
# tree has it (one_live_slots 16: a call of up to 16 slots is split as for one live sequence, with the 16-bit blocks)
# and with one_live_slots 64 (a copy of the tree, /tmp/live64), for the tail's 16-63-running steps.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
mkdir -p /tmp/live64 && cp -r benchmarks checkpoints jaxdyn pallas_kernels serving /tmp/live64/
sed -i 's/one_live_slots: int = 16$/one_live_slots: int = 64/' /tmp/live64/pallas_kernels/paged_decode.py
grep -n "one_live_slots: int" /tmp/live64/pallas_kernels/paged_decode.py
P=4/64/800-1600,20/64/600-1400,39/64/200-1360,60/64/200-1000,100/128/200-1000
PYTHONPATH=$PWD:/tmp/pydeps timeout 100 python -m benchmarks.kernels --kv-dtype fp8 --entry-only --entry-points $P \
  2>&1 | grep -v "^W" | tee $OUT/entry_live16.txt | tail -14
(cd /tmp/live64 && PYTHONPATH=/tmp/live64:/tmp/pydeps timeout 100 python -m benchmarks.kernels --kv-dtype fp8 \
  --entry-only --entry-points $P 2>&1 | grep -v "^W" | tee $OUT/entry_live64.txt | tail -14)
