"""benchmarks/gpu/memory_probe.py on the CPU: its stages in build_engine's order, and a failing stage reported."""

import re

from benchmarks.gpu import memory_probe as mp

SMALL = ('{"num_pages": %s, "max_num_seqs": 8, "max_num_batched_tokens": 64, "token_buckets": [16, 64], '
         '"seq_buckets": null, "prefill_programs": null, "executable_cache_dir": null}')


def test_every_stage_is_reported_in_order(capsys):
    assert mp.main(["--model", "tiny", "--engine", SMALL % 256]) == 0
    out = capsys.readouterr().out
    stages = ["backend started (cpu)", "engine on the weights' shapes (256 KV pages sized)",
              "weights loaded, steps compiled", "compiled steps: ", "KV pages allocated", "warm-up",
              "built: 256 pages of 16 tokens"]
    at = [out.find(s) for s in stages]
    assert -1 not in at and at == sorted(at), out
    assert re.search(r"compiled steps: \d+ steps: the largest allocates \d+\.\d{3} GiB as it runs", out), out


def test_a_failing_stage_is_named_with_the_memory_then(capsys):
    # more pages than the host holds: the engine refuses them as it is built on the weights' shapes
    assert mp.main(["--model", "tiny", "--engine", SMALL % 10 ** 12]) == 1
    out = capsys.readouterr().out
    assert "FAILED at engine on the weights' shapes: ValueError: a KV cache of 1000000000000 pages" in out
    assert "at the failure: n/a" in out and "built:" not in out


def test_memory_stats_described_in_gib():
    stats = {"bytes_in_use": 3 * mp.GIB, "peak_bytes_in_use": 5 * mp.GIB, "bytes_limit": 60 * mp.GIB, "other": 1}
    assert mp.describe(stats) == "in use 3.00 GiB, peak 5.00 GiB, limit 60.00 GiB"
    assert mp.describe(None) == "n/a"
