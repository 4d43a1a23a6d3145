"""benchmarks/gpu/start_probe.py: the server's start-up lines parsed, the table, and one real cold and warm
start of the tiny preset on the CPU."""

import json

import pytest

from benchmarks.gpu import start_probe as sp

LINES = ["INFO something",
         "jaxdyn: loaded /tmp/m (15316.5 MiB of weights) in 6.6 s, warm-up (compiling every bucket, begun with "
         "the load) 51.2 s",
         "jaxdyn: step costs (ms by token bucket, measured at warm-up) {16: 4.93, 2048: 48.64}",
         "jaxdyn: serving 'x' at http://127.0.0.1:1/v1"]


def test_parse_start_reads_load_warmup_and_step_costs():
    assert sp.parse_start(LINES) == {"load_s": 6.6, "warmup_s": 51.2, "costs": {16: 4.93, 2048: 48.64}}
    assert sp.parse_start(LINES[:2])["costs"] == {}
    with pytest.raises(ValueError, match="no load line"):
        sp.parse_start(["Traceback", "RuntimeError: out of memory"])


def test_table_gives_targets_and_step_costs_against_the_first_config():
    res = [{"cold": {"ready_s": 66.0, "load_s": 6.6, "warmup_s": 51.2, "costs": {16: 5.0, 2048: 50.0}},
            "warm": {"ready_s": 7.5, "load_s": 3.0, "warmup_s": 2.0, "costs": {}}},
           {"cold": {"ready_s": 30.0, "load_s": 6.0, "warmup_s": 20.0, "costs": {16: 5.0, 2048: 55.0}},
            "warm": {"ready_s": None, "why": "not ready within 170 s"}}]
    text = sp.table([{}, {"first_compiles_alone": False}], res)
    lines = text.splitlines()
    assert "| `{}` | 66.0 (1.10x) | 6.6 / 51.2 | 7.5 (0.50x) | 16: 5.00 (1.000x), 2048: 50.00 (1.000x) |" in lines
    assert ('| `{"first_compiles_alone": false}` | 30.0 (0.50x) | 6.0 / 20.0 | not ready '
            '| 16: 5.00 (1.000x), 2048: 55.00 (1.100x) |') in lines


def test_a_cold_and_a_warm_start_of_the_tiny_preset(tmp_path, capsys):
    engine = {"num_pages": 64, "max_num_seqs": 4, "max_num_batched_tokens": 16, "max_model_len": 64,
              "token_buckets": [16], "page_buckets": [4]}
    rc = sp.main(["--configs", "[{}]", "--model", "tiny", "--engine", json.dumps(engine), "--dtype", "float32",
                  "--scratch", str(tmp_path), "--timeout-s", "240"])
    out = capsys.readouterr().out
    assert rc == 0, out
    cold = next(line for line in out.splitlines() if line.startswith("config 0 {} cold: ready in"))
    warm = next(line for line in out.splitlines() if line.startswith("config 0 {} warm: ready in"))
    # the warm start loaded the steps the cold one compiled into this configuration's own cache (on the CPU
    # JAX's: the executable cache saves nothing beside it there, see executable_cache.ExecutableCache.save)
    assert any(p.name != "jaxdyn-executables" for p in (tmp_path / "jax_cache_0").iterdir())
    warmup = [float(line.split("warm-up ")[1].split(" s")[0]) for line in (cold, warm)]
    assert warmup[1] < warmup[0]
    assert "| `{}` |" in out and "reproduce: python -m benchmarks.gpu.start_probe" in out


def test_ab_offline_only_keys_are_refused(capsys):
    for cfg in ('[{"tree": "."}]', '[{"quant": "fp8"}]'):
        with pytest.raises(SystemExit):
            sp.main(["--configs", cfg, "--model", "tiny"])
        assert "are ab_offline's" in capsys.readouterr().err
