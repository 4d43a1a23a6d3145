"""The reader-thread benchmark: both modes run the real ProcessEngine._handle and print the table."""

import tempfile

from benchmarks import stream_reader
from benchmarks.gpu.suite import model_dir


def test_reader_cost_runs_both_modes_and_prints_the_ratio_and_command(capsys):
    assert stream_reader.main(["--streams", "8", "--steps", "3", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "| decoded by the engine |" in out and "| decoded by the reader |" in out and "ratio " in out
    assert "python -m benchmarks.stream_reader --streams 8 --steps 3 --preset tiny" in out


def test_the_reader_decodes_text_only_where_the_engine_did_not():
    """The measured work is what it says: either way each stream's text is its tokens' words, decoded by the
    reader or carried in the message."""
    from jaxdyn.engine.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(model_dir("tiny", tempfile.mkdtemp()))
    for reader_decodes in (True, False):
        seconds, streams = stream_reader.measure(tok, 4, 3, reader_decodes=reader_decodes)
        assert seconds > 0 and len(streams) == 4
        for ids, text in streams:
            assert len(ids) == 3 and text == "".join(f"w{t} " for t in ids)
