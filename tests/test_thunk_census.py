"""benchmarks/gpu/thunk_census.py: a conditional inside a command buffer is reported with that buffer, one outside
any with "(top level)"; thunks are counted by kind."""

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
    assert out.startswith("1 thunk sequences after the thunk passes")
    assert "2 with a conditional" in out and "<- in: (top level)" in out
