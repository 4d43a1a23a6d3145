"""benchmarks/gpu/ncu_decode.py: the decode calls it runs for Nsight Compute (here through Pallas interpret mode)."""

import pytest

from benchmarks.gpu import ncu_decode


def test_runs_the_point_with_the_blocks_asked_for(capsys):
    ncu_decode.main(["--batch", "2", "--context", "32", "--kv-dtype", "fp8", "--blocks", "2:1:6", "--calls", "1"])
    out = capsys.readouterr().out
    assert "decode 2 x 32, fp8 pages" in out
    assert "pages_per_block=2, num_warps=1, num_stages=6" in out


@pytest.mark.parametrize("argv,message", [(["--blocks", "2:1"], "--blocks: expected P:W:S"),
                                          (["--context", "8"], "--context >= 16")])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        ncu_decode.main(argv)
    assert message in capsys.readouterr().err
