"""The CPU engine host-time benchmark: a preset's depth and vocabulary at a tiny width, word-level tokenizer."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.gpu.suite import model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_dir_overrides_take_the_preset_s_depth_and_vocabulary_at_another_width(tmp_path):
    d = model_dir("llama-3.1-8b", str(tmp_path), hidden_size=64, vocab_size=300)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (32, 64, 300)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    assert tok.get_vocab_size() == 300 and tok.decode([5, 299]) == "w5 w299 "
    assert model_dir("llama-3.1-8b", str(tmp_path)) != d      # the unchanged preset has its own directory


@pytest.mark.parametrize("served", [False, True])
def test_preset_run_reports_a_row_per_batch_and_the_command_that_reproduces_it(tmp_path, served):
    """``--served``: the requests without detokenization and the steps' wire outputs, as ``jaxdyn serve``'s
    engine process runs them."""
    out = tmp_path / "r.md"
    cmd = [sys.executable, "benchmarks/engine_host_time.py", "--preset", "llama-3.1-8b", "--layers", "2",
           "--vocab", "1000", "--batches", "1", "3", "--steps", "3", "--greedy", "--no-overlap",
           "--out", str(out)] + (["--served"] if served else [])
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    text = out.read_text()
    assert ("`python benchmarks/engine_host_time.py --steps 3 --batches 1 3 --preset llama-3.1-8b --layers 2 "
            "--vocab 1000 --greedy --no-overlap" + (" --served`" if served else "`")) in text
    assert "2 layers, vocab 1000, word-level tokenizer" in text and "overlap off" in text
    assert ("detokenization by the server" in text) == served and ("detokenization on" in text) != served
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 2
