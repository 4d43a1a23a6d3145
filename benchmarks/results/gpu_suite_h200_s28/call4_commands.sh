# Twenty-eighth session, call 4 (~470 s at most):
# 1. the GPU host's tokenization of 1,000 ShareGPT-shaped text prompts, one by one against encode_batch (what
#    LLM.generate now does before queueing them);
# 2. decode-only steps through the attention entry point at the run's shapes (live / slots / context), with the
#    entry's two kernels each alone: where a step's attention goes beyond its decode kernel on this H100;
# 3. skip_idle_prefill's GPU tests, then the engine offline: the tree against skip_idle_prefill (the prefill kernel
#    under a lax.cond, launched only in steps with a prompt chunk; never measured on a GPU), three rounds, own caches.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 60 python - <<'PY' 2>&1 | grep -v "^W" | tee $OUT/tokenize.txt
import tempfile, time, numpy as np
from benchmarks.gpu.suite import model_dir
from jaxdyn.engine.tokenizer import Tokenizer
from serving.bench import datasets
tok = Tokenizer.from_pretrained(model_dir("llama-3.1-8b", tempfile.mkdtemp()))
src = datasets.PromptSource(datasets.seeded_rng(0, 1, 0), tok, None)
p, _ = datasets.sharegpt_lengths(np.random.default_rng(0), 1000)
texts = [src.make(int(n)) for n in p]
for name, f in (("one by one", lambda: [tok.encode(t) for t in texts]), ("encode_batch", lambda: tok.encode_batch(texts))):
    best = min((lambda t: (f(), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(3))
    print(f"tokenize 1,000 ShareGPT-shaped prompts ({int(p.sum())} tokens), {name}: {best * 1e3:.1f} ms (best of 3)")
PY
timeout 100 python -m benchmarks.kernels --entry-only --kv-dtype fp8 \
  --entry-points 56/1024/256,726/768/304,200/256/500,88/128/640,30/64/800,12/16/900,3/16/1100 \
  --out $OUT/entry_fp8.md 2>&1 | grep -v "^W" | tail -1
grep "^|" $OUT/entry_fp8.md | head -12
timeout 60 python -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_kernels.py -k gpu_skip 2>&1 \
  | tail -2 | tee $OUT/gpu_tests.txt
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
timeout 270 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_tree"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "skip_idle_prefill": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_skip"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_skip_idle.txt | tail -8
