# Session 34, call 2 (on the machine call 1 left warm): which XLA flags of jax 0.11.2's library name compilation
# parallelism (call 1's --xla_gpu_enable_llvm_module_compilation_parallelism is refused: "Unknown flag"), and the
# decode kernel through the entry point at uniform against drawn contexts of the same mean (its imbalance).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
SO=$(python -c "import jaxlib,os;print(os.path.dirname(jaxlib.__file__))")
for f in $(find $SO /usr/local/lib/python3.12 -name "*.so*" -size +50M 2>/dev/null | grep -i "xla\|jax\|cuda_plugin\|pjrt" | head -5); do
  echo "== $f"; strings $f | grep -o "xla_gpu_[a-z_]*\(parallel\|llvm\|split\|compile\)[a-z_]*" | sort -u | head -30
done > $OUT/flags.txt 2>&1
timeout 200 python -m benchmarks.kernels --entry-only --entry-points 88/128/640,88/128/100-1180,39/64/780,39/64/200-1360,220/256/475,220/256/100-850 --attention-programs 0 --kv-dtype fp8 2>&1 | grep -v "^W" | tail -25 | tee $OUT/entry_imbalance.txt
