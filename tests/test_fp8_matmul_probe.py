"""benchmarks/gpu/fp8_matmul_probe.py's configuration parsing (the probe itself needs a GPU)."""

import pytest

from benchmarks.gpu.fp8_matmul_probe import parse_quantize_config


def test_quantize_configurations_parse_with_their_defaults_and_bad_ones_are_named():
    # (rows a program, warps, one pass, columns a block or None for auto, stages)
    assert parse_quantize_config("1/16") == (1, 16, True, None, 1)
    assert parse_quantize_config("2/4/2l") == (2, 4, False, None, 1)
    assert parse_quantize_config("4/8/2l/1024/3") == (4, 8, False, 1024, 3)
    assert parse_quantize_config("1/8/1p/auto/2") == (1, 8, True, None, 2)
    for bad in ("1", "1/16/3p", "1/16/1p/auto/2/9"):
        with pytest.raises(SystemExit, match="--quantize-configs"):
            parse_quantize_config(bad)
