# Session 23, third try of callB (callB was taken back twice): its thunk-sequence part alone (~170 s).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
XLA_FLAGS="--xla_dump_to=/tmp/xdump" timeout 150 python -m benchmarks.gpu.profile_run --windows none --quant fp8 \
  --num-prompts 64 --engine '{"kv_cache_dtype": "fp8", "token_buckets": [16, 2048], "sampler_switch": true, "skip_idle_prefill": true}' \
  2>&1 | grep -v "^W" | tail -4 | tee $OUT/switch_skip_run.txt
python - <<'PY' 2>&1 | tee $OUT/conditionals_in_graphs.txt
import glob, os
files = sorted(glob.glob("/tmp/xdump/*thunk_sequence_after_thunk_passes*.txt"))
print(f"{len(files)} thunk sequences after the thunk passes")
for f in files:
    lines = open(f).read().splitlines()
    hits = [i for i, l in enumerate(lines) if "onditional" in l]
    kinds = {k: sum(k in l for l in lines) for k in ("kCommandBuffer", "kMemset32BitValue", "kMemzero", "kCopy",
                                                      "kConditional", "kCustomCall", "kCubSort", "kWhile")}
    print(f"== {os.path.basename(f)}: {len(lines)} lines, {len(hits)} with a conditional; thunks by kind {kinds}")
    for i in hits[:40]:
        ind = len(lines[i]) - len(lines[i].lstrip())
        parent = next((lines[j].strip()[:100] for j in range(i - 1, -1, -1)
                       if len(lines[j]) - len(lines[j].lstrip()) < ind), "(top level)")
        print(f"  indent {ind}: {lines[i].strip()[:100]}  <- in: {parent}")
PY
ls /tmp/xdump | grep -c . ; ls /tmp/xdump | grep -i thunk | head
ls /tmp/xdump | sed -E "s/^module_[0-9]+\.//; s/^[a-z_0-9]+\.//" | sort | uniq -c | sort -rn | head -40 > $OUT/dump_kinds.txt
for f in $(grep -l onditional /tmp/xdump/*thunk_sequence_after_thunk_passes*.txt 2>/dev/null | head -3); do
  gzip -c $f > $OUT/$(basename $f).gz; done    # the step's thunks, to read at leisure
