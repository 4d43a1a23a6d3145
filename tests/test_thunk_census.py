"""benchmarks/gpu/thunk_census.py: a conditional inside a command buffer is reported with that buffer, one outside
any with "(top level)"; thunks are counted by kind."""

import os
import subprocess
import sys

from benchmarks.gpu import thunk_census

SEQUENCE = """\
000: kCommandBuffer command_buffer_1
  001: kKernel fusion.1
  002: kConditional conditional.7
    003: kKernel branch_0 fusion.2
004: kCopy copy.3
005: kConditional conditional.9
"""


def test_conditionals_are_named_with_the_thunk_that_holds_them(tmp_path, capsys):
    lines = SEQUENCE.splitlines()
    kinds, count, held = thunk_census.census(lines)
    assert count == 2 and kinds["kCommandBuffer"] == 1 and kinds["kConditional"] == 2 and kinds["kCopy"] == 1
    assert held == [(2, "002: kConditional conditional.7", "000: kCommandBuffer command_buffer_1"),
                    (0, "005: kConditional conditional.9", "(top level)")]
    (tmp_path / "module_0001.jit_step.thunk_sequence_after_thunk_passes.txt").write_text(SEQUENCE)
    (tmp_path / "module_0001.jit_step.thunk_sequence.txt").write_text(SEQUENCE)      # before the passes: not read
    assert thunk_census.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1] == "1 thunk sequences after the thunk passes"
    assert "2 with a conditional" in out and "<- in: (top level)" in out


def test_default_command_buffer_kinds_follow_xla_flags():
    """XLA's default kinds hold CONDITIONAL (the sampler switch's conditional is recorded into the step's CUDA
    graph only then), and a process's XLA_FLAGS choice is what it reports."""
    kinds = thunk_census.default_command_buffer_kinds()
    assert "CONDITIONAL" in kinds and "FUSION" in kinds and "WHILE" not in kinds
    code = "from benchmarks.gpu import thunk_census as t; print(','.join(t.default_command_buffer_kinds()))"
    for flag, expected in (("FUSION,WHILE,CUBLASLT", "FUSION,WHILE,CUBLASLT"), ("", "")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "XLA_FLAGS": f"--xla_gpu_enable_command_buffer={flag}"})
        assert out.stdout.strip() == expected
