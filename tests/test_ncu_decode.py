"""benchmarks/gpu/ncu_decode.py: the attention calls it runs for Nsight Compute (here through Pallas interpret
mode)."""

import pytest

from benchmarks.gpu import ncu_decode


def test_runs_the_decode_point_with_the_blocks_asked_for(capsys):
    ncu_decode.main(["--batch", "2", "--context", "32", "--kv-dtype", "fp8", "--blocks", "2:1:6", "--calls", "1"])
    out = capsys.readouterr().out
    assert "decode 2 x 32, fp8 pages" in out
    assert "pages_per_block=2, num_warps=1, num_stages=6" in out


def test_runs_the_prefill_point_with_the_blocks_asked_for(capsys):
    ncu_decode.main(["--prefill", "--batch", "2", "--context", "16", "--chunk", "32", "--kv-dtype", "fp8",
                     "--blocks", "16:2:4:3", "--calls", "1"])
    out = capsys.readouterr().out
    assert "prefill 2 x 32 after 16, fp8 pages" in out
    assert "block_rows=16, pages_per_block=2, num_warps=4, num_stages=3" in out


@pytest.mark.parametrize("argv,message", [(["--blocks", "2:1"], "--blocks: expected P:W:S"),
                                          (["--prefill", "--blocks", "2:1:6"], "--blocks: expected R:P:W:S"),
                                          (["--blocks", "a:b:c"], "--blocks: expected P:W:S"),
                                          (["--context", "8"], "--context >= 16")])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        ncu_decode.main(argv)
    assert message in capsys.readouterr().err
