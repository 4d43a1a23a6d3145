# For the next device session's first call (session 20's gpu_suite_h200_s20/next_call_commands.sh, never run and now
# replaced by this, revised in the twenty-first: the entry point's timing against the memset tree; at most 570 s by
# its time limits): why the decode kernel over fp8 pages is latency-bound at 16-128 slots (Nsight Compute's
# stall reasons at 88 x 640, the table's one-warp blocks; Triton's pass log: was its loop pipelined?); where the MLP
# input's quantization kernel spends its time (2,048 rows, 16 warps); the fp8 blocks gathering by page, and with other
# stages, pages or warps at the small points; the entry point's two kernels apart at the run's shapes (what a
# decode-only step pays for its prefill kernel).
# Copy $OUT's files into the session's folder. The second call: gpu_suite_h200_s21/next_call2_commands.sh.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1); echo "ncu: $NCU"
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats --section SourceCounters"
for pt in "88 640"; do set -- $pt
  timeout 100 $NCU --clock-control none --kernel-name regex:paged_decode --launch-skip 2 --launch-count 1 $SECTIONS \
    python -m benchmarks.gpu.ncu_decode --batch $1 --context $2 --kv-dtype fp8 > $OUT/ncu_decode_fp8_$1x$2.txt 2>&1
  echo "== fp8 $1 x $2 rc=$?"; grep -E "Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|No Eligible|Stall" $OUT/ncu_decode_fp8_$1x$2.txt | head -24
done
# the first configuration timed is the one asked for (1 row, 16 warps: the MLP input's default); the 3rd launch
timeout 100 $NCU --clock-control none --kernel-name regex:quantize_rows --launch-skip 2 --launch-count 1 $SECTIONS \
  python -m benchmarks.gpu.fp8_matmul_probe --quantize-only --quantize-rows 2048 --quantize-inputs raw --quantize-configs 1/16 --reps 1 > $OUT/ncu_quantize_2048.txt 2>&1
echo "== quantize rc=$?"; grep -E "Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Local Memory|Stall" $OUT/ncu_quantize_2048.txt | head -20
unset XLA_PYTHON_CLIENT_PREALLOCATE
# the one-warp fp8 blocks gathering by page (2 page ids an iteration) against by row (32), never swept for fp8 pages
timeout 60 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-variants 2:1:6:264:rows,2:1:6:264:pages,4:1:6:264:pages --sweep-points 32x800,88x640,768x304 --out $OUT/kernels_fp8_gather.md 2>&1 | grep -v "^W" | tail -1
grep "^|" $OUT/kernels_fp8_gather.md
# stages (latency per load level = (stages - 1) / 2 with the page-id level: 5 and 6 alike, 7 more), pages a block,
# warps, at the small points (the loop's ~4 pipeline iterations of prologue weigh on 20-iteration loops)
timeout 100 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-variants 2:1:6:264:rows,2:1:5:264:rows,2:1:7:264:rows,2:1:3:264:rows,1:1:6:264:rows,4:1:4:264:rows,8:1:3:264:rows,4:2:4:264:rows --sweep-points 32x800,64x800,88x640,128x640 --out $OUT/kernels_fp8_small.md 2>&1 | grep -v "^W" | tail -1
grep "^|" $OUT/kernels_fp8_small.md
timeout 80 python -m benchmarks.kernels --entry-only --kv-dtype fp8 --entry-points 726/768/304,200/256/500,88/128/640,30/64/800,3/16/1100 --out $OUT/entry_halves_fp8.md 2>&1 | grep -v "^W" | tail -1
grep "^|" $OUT/entry_halves_fp8.md
# the same with the in-place output's zeros a memset again (attention_memset.patch): what a layer's memset costs
R=$PWD; mkdir -p /tmp/memset && cp -r jaxdyn pallas_kernels checkpoints benchmarks serving /tmp/memset/ \
  && (cd /tmp/memset && patch -p1 < $R/benchmarks/results/gpu_suite_h200_s21/attention_memset.patch) | tail -1
(cd /tmp/memset && PYTHONPATH=/tmp/memset:/tmp/pydeps timeout 80 python -m benchmarks.kernels --entry-only --kv-dtype fp8 --entry-points 726/768/304,200/256/500,88/128/640,30/64/800,3/16/1100 --out $OUT/entry_halves_fp8_memset.md 2>&1 | grep -v "^W" | tail -1)
grep "^|" $OUT/entry_halves_fp8_memset.md
# whether Triton pipelined the decode loop's gathers (XLA's Triton pass log: tt.latency before ScheduleLoops,
# loop.stage before Pipeline, ttg.async_copy_global_to_local after it)
XLA_FLAGS="--xla_dump_to=/tmp/tdump --xla_dump_hlo_pass_re=triton-fusion-emitter" timeout 45 python -m benchmarks.gpu.ncu_decode --batch 88 --context 640 --kv-dtype fp8 > /dev/null 2>&1
ls /tmp/tdump | grep -i -E "triton|passes" | head; for f in $(ls /tmp/tdump/*triton-passes.log 2>/dev/null | head -3); do
  echo "== $f"; grep -c "async_copy_global_to_local" $f; grep -o -E "tt.latency = [0-9]+|loop.stage = [0-9]+" $f | sort | uniq -c | head; done > $OUT/triton_pipelining.txt 2>&1
cat $OUT/triton_pipelining.txt | head -30
