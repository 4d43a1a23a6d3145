"""benchmarks/gpu/dispatch_probe.py: its table for the tree's step and the switch's (runner fields from --runner),
and --runner's misuse named."""

import pytest

from benchmarks.gpu import dispatch_probe


@pytest.mark.parametrize("runner", ['{}', '{"sampler_switch": true}'])
def test_the_probe_times_the_step_it_is_given(runner, capsys):
    assert dispatch_probe.main(["--model", "tiny", "--buckets", "16", "--steps", "3", "--runner", runner]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 16 |")]
    assert len(rows) == 4 and all(float(x) > 0 for row in rows for x in row.strip("| ").split(" | ")[3:])
    assert ("--runner" in out.splitlines()[-1]) == (runner != "{}")
    assert ("'sampler_switch': True" in out) == (runner != "{}")


def test_the_probe_config_takes_runner_fields():
    config = dispatch_probe.probe_config((16, 64), {"sampler_switch": True, "kv_cache_dtype": "fp8"})
    assert config.sampler_switch and config.kv_cache_dtype == "fp8" and config.token_buckets == (16, 64)
    assert config.max_num_batched_tokens == 64 and config.page_buckets == (128,)


@pytest.mark.parametrize("runner, message", [("[1]", "expected a JSON object"), ("{", "not JSON"),
                                             ('{"sampler_swich": true}', "not RunnerConfig fields: sampler_swich")])
def test_runner_misuse_is_named(runner, message, capsys):
    with pytest.raises(SystemExit) as e:
        dispatch_probe.main(["--runner", runner])
    assert e.value.code == 2 and message in capsys.readouterr().err
