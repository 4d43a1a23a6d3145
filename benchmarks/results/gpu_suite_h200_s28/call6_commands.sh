# Twenty-eighth session, call 6 (~200 s at most): the fp8 quantization kernel's reload form (two unrolled passes: all
# blocks loaded at once for the row maxima, then again to divide and store; the row never whole in registers) against
# the one-pass default, at the large steps' rows, the MLP's input from the raw products and the attention's output.
# Why: in a 2,048-token step the MLP's kernel took 92 µs a layer against 40 for its bytes (session 20, H200): a
# 16-warp program a row holding 2 x 14,336 values and their channel scales, one program a multiprocessor.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 50 python -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_fp8_quantize.py -k "8b_widths" 2>&1 \
  | tail -2 | tee $OUT/gpu_tests.txt
timeout 150 python -m benchmarks.gpu.fp8_matmul_probe --quantize-only --quantize-rows 768,2048 --quantize-inputs raw,attn \
  --quantize-configs 1/16,1/16/reload,1/8/reload,1/4/reload,2/16/reload,2/8/reload --reps 5 2>&1 | grep -v "^W" \
  | tee $OUT/quantize_probe.txt | grep "^|"
