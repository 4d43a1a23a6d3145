"""benchmarks/nested_layers_check.py: a bucket's step compiled with the layers nested and unrolled, compared."""

import pytest

from benchmarks import nested_layers_check


def test_float32_steps_compile_to_the_same_program_and_the_table_says_so(capsys):
    assert nested_layers_check.main(["--model", "tiny", "--quant", "none", "--buckets", "16", "--sampler-switch",
                                     "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "| switch 16 128 |" in out and "| 0 |" in out
    assert out.rstrip().endswith("compiled programs: same (0 of 1 parts differ)")


def test_the_census_counts_instructions_by_opcode_and_type_and_fusions_by_kind():
    text = """HloModule m
%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %e = f32[4]{0} exponential(f32[4]{0} %p)
}
ENTRY %main (a: f32[4]) -> bf16[4] {
  %a = f32[4]{0} parameter(0)
  %f = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%fused
  ROOT %c = bf16[4]{0} convert(f32[4]{0} %f)
}"""
    c = nested_layers_check.census(text)
    assert c[("parameter", "f32[4]")] == 2 and c[("exponential", "f32[4]")] == 1
    assert c[("fusion", "f32[4]")] == 1 and c[("fusion kind", "kLoop")] == 1 and c[("convert", "bf16[4]")] == 1


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        nested_layers_check.main(["--buckets", "16,x"])
    assert "--buckets: expected token counts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        nested_layers_check.main(["--layers", "0"])
    assert "--layers: expected at least 1" in capsys.readouterr().err
