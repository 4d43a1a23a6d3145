"""benchmarks/gpu/norm_probe.py: its table, run in Pallas interpret mode on the CPU (the timings are a GPU's), and
its refusals."""

import pytest

from benchmarks.gpu import norm_probe


def test_the_probe_prints_a_row_a_row_count_with_each_warp_count(capsys):
    assert norm_probe.main(["--rows", "2,3", "--width", "256", "--configs", "1/4,2/8", "--reps", "1",
                            "--impl", "interpret"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 2 |") or line.startswith("| 3 |")]
    assert len(rows) == 2 and all(line.count("|") == 6 for line in rows)
    assert rows[1].endswith("| - |")          # 2 rows a program do not divide 3 rows
    assert "kernel 2/8" in out and "reproduce: python -m benchmarks.gpu.norm_probe --rows 2,3" in out
    best = [line for line in out.splitlines() if line.startswith("best at ")]
    assert len(best) == 2 and best[1] == "best at 3 rows: 1/4"


@pytest.mark.parametrize("argv", [["--rows", "a"], ["--rows", "0"], ["--width", "8"], ["--width", "40"],
                                  ["--configs", "1/0"], ["--configs", "4"], ["--configs", "1/x"], ["--configs", "3/8"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        norm_probe.main(argv)
    assert e.value.code == 2
