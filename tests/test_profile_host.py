"""benchmarks/gpu/profile_host.py's call timing, on the CPU (its figures are the GPU's)."""

import pytest

from benchmarks.gpu import profile_host as ph


@pytest.mark.parametrize("split", [False, True])
def test_call_times_wrap_every_step_by_part_and_unwrap(split):
    from jaxdyn import LLM, SamplingParams
    from jaxdyn.engine.core import EngineConfig
    from jaxdyn.engine.llm import build_engine
    from serving.cli import DEMO_MODEL
    engine = build_engine(DEMO_MODEL, config=EngineConfig(
        num_pages=64, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128, token_buckets=[16],
        separate_sampler=split))
    llm = LLM(engine=engine)
    before = dict(engine.runner._compiled)
    times = {}
    undo = ph._time_calls(engine.runner, times)
    out = llm.generate([[5, 6, 7]] * 3, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)
    undo()
    assert engine.runner._compiled == before
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)
    parts = {kind for kind, _ in times}
    assert parts == ({"step", "forward", "sample"} if split else {"step"})     # a split step whole, and its calls
    calls = {kind: n for (kind, _), (n, _, _) in times.items()}
    assert min(calls.values()) >= 4 and len(set(calls.values())) == 1      # every step, each part once
    # the C++ fast path after the first call of each executable (a split step's whole counts its two calls')
    assert all(slow <= (2 if split and kind == "step" else 1) for (kind, _), (_, _, slow) in times.items())
    if split:       # the whole step's host time holds its two calls'
        for t in {t for _, t in times}:
            assert times[("step", t)][1] >= times[("forward", t)][1] + times[("sample", t)][1]


def test_call_times_keep_fewer_slots_apart():
    # seq_buckets: a step of fewer sequence slots than its bucket's own is its own executable, timed as "tokens/slots"
    from jaxdyn import LLM, SamplingParams
    from jaxdyn.engine.core import EngineConfig
    from jaxdyn.engine.llm import build_engine
    from serving.cli import DEMO_MODEL
    engine = build_engine(DEMO_MODEL, config=EngineConfig(
        num_pages=64, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128, token_buckets=[16],
        seq_buckets=[(16, 2)]))
    times = {}
    undo = ph._time_calls(engine.runner, times)
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    LLM(engine=engine).generate([[5, 6, 7]] * 2, sp, use_tqdm=False)       # two rows: the 2 slots
    LLM(engine=engine).generate([[5, 6, 7]] * 3, sp, use_tqdm=False)       # three: the bucket's own 4
    undo()
    assert {t for _, t in times} == {16, "16/2"}


def test_part_options_need_a_known_kind():
    assert ph._kind_options('sample={"a": 1}') == ("sample", {"a": 1})
    with pytest.raises(SystemExit, match="KIND=JSON"):
        ph._kind_options('model={"a": 1}')


def test_an_fp8_lm_head_needs_an_fp8_model(capsys):
    import pytest
    with pytest.raises(SystemExit):
        ph.main(["--quantize-lm-head"])
    assert "--quantize-lm-head needs --quant fp8" in capsys.readouterr().err
