"""benchmarks/quant_quality.py's scoring: ``--compute-dtype`` reaches the model, and the fp8 model through the fused
norms' reference scores as the unfused fp8 model (on the CPU, bit for bit; on a GPU the kernel's rounding is what
the row measures)."""

import numpy as np

from tests.support import make_byte_tokenizer, make_hf_checkpoint


def test_the_fused_norm_row_scores_the_unfused_fp8_model_on_the_cpu(tmp_path, monkeypatch):
    import jaxdyn.models.llama as llama
    from benchmarks import quant_quality
    from checkpoints.convert import convert
    from pallas_kernels.rms_norm_fp8 import add_rms_norm_fp8
    calls = []
    monkeypatch.setattr(llama, "add_rms_norm_fp8", lambda *a, **kw: calls.append(1) or add_rms_norm_fp8(*a, **kw))
    src = make_hf_checkpoint("llama3.1", str(tmp_path / "hf"))
    make_byte_tokenizer(src)
    out = str(tmp_path / "fp8")
    convert(src, out, dtype="bfloat16", quant="fp8", progress=False)
    prompts = [[5, 9, 200, 17, 3, 3, 40, 8], list(range(30, 70))]
    f32, nbytes, linear = quant_quality.score(out, prompts)
    bf16, *_ = quant_quality.score(out, prompts, compute_dtype="bfloat16")
    assert not calls
    fused, fbytes, flinear = quant_quality.score(out, prompts, compute_dtype="bfloat16", fused_norm=True)
    assert calls                                                        # the fused layers ran
    assert (fbytes, flinear) == (nbytes, linear) and 0 < linear < nbytes
    for p, a, b, c in zip(prompts, f32, bf16, fused):
        assert a.shape == b.shape == c.shape and a.shape[0] == len(p) and np.isfinite(c).all()
        np.testing.assert_array_equal(c, b)
    assert any(not np.array_equal(a, b) for a, b in zip(f32, bf16))      # the compute dtype took effect
