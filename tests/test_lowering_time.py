"""benchmarks/lowering_time.py: the suite's steps traced and lowered for a GPU on the CPU, part by part."""

import pytest

from benchmarks import lowering_time


def test_it_lowers_each_part_for_a_gpu_and_prints_the_sum(capsys):
    assert lowering_time.main(["--model", "llama-3.2-1b", "--buckets", "16,2048", "--sampler-switch"]) == 0
    out = capsys.readouterr().out
    # one part a bucket with the switch, and one for the suite engine's 512 slots of the 2,048 bucket
    assert out.count("| switch ") == 3 and "| switch 2048 128 512 |" in out
    assert "3 parts traced and lowered for a GPU in" in out and "--sampler-switch all --buckets 16,2048" in out
    from pallas_kernels import paged_decode, rope_kv, sampling_thresholds
    # put back for the rest of the process
    assert not paged_decode.on_gpu() and not sampling_thresholds.on_gpu() and not rope_kv.on_gpu()
    assert "nested_layers=True" in out
    assert lowering_time.main(["--model", "llama-3.2-1b", "--buckets", "2048", "--no-nested-layers"]) == 0
    out = capsys.readouterr().out
    assert "nested_layers=False" in out and out.rstrip().endswith("--sampler-switch plain-full --buckets 2048 "
                                                                  "--no-nested-layers")
    # a GPU's default: greedy's and random's steps, and plain's and full's switch, each with the bucket's own slots
    # and with 512, its fewer slots lowered with their own shapes (not the own slots' trace again)
    assert "6 parts traced" in out and out.count("| step 2048 ") == 4 and out.count("| switch 2048 ") == 2
    lowered = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in out.splitlines()
               if line.startswith("| step") or line.startswith("| switch")}
    assert lowered["step 2048 128 greedy 512"] > 0 and lowered["switch 2048 128 512"] > 0


def test_buckets_below_the_step_budget_are_refused(capsys):
    with pytest.raises(SystemExit):
        lowering_time.main(["--buckets", "16,64"])
    assert "the largest must be at least 2048" in capsys.readouterr().err
